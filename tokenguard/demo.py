"""``tokenguard demo``: one scripted session on the bundled model that shows, with the
numbers it measures as it runs, what the guard does to every call.

    make demo            (or: python -m tokenguard demo)

Sections: exact offline counts (English and Chinese, three tokenizers); a metered
multi-turn chat whose history is fitted into a small context; an exact-cache hit; a
looping generation stopped; a budget that refuses a call before the model runs; a
nested call that gets only the context it needs; and the ledger's cost report.
Nothing printed is written in advance: every count, cost and time is the run's own.

The bundled model is free. So that the costs mean something, the demo prices its
tokens at gpt-4o-mini's rate from the genai-prices catalogue: what the same traffic
would cost on that API. :func:`meter_line` is the one-line meter that ``tokenguard
chat`` prints after each answer too.
"""

from __future__ import annotations

import contextlib
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

import tokenguard as tg
from tokenguard.cache import ExactCache

__all__ = ["PRICED_AS", "loading", "meter_line", "run", "strategy_name"]

#: The API model whose catalogue price the demo puts on the bundled model's tokens.
PRICED_AS = "gpt-4o-mini"
_MODEL = "SmolLM2-135M-Instruct"
_WIDTH = 88

_CHAT_TURNS = (
    "What is a token in a language model? Answer in one sentence.",
    "Why does a long chat cost more than a short one? One sentence.",
    "How can I keep a long chat cheap? One sentence.",
)
_CHAT_CONTEXT_TOKENS = 120
_CACHED_QUESTION = "What is the capital of France? Answer in one sentence."
_LOOPING_PROMPT = "Give me a list of ten fruits."
_LOOP_CAP = 320
_BUDGET_TOKENS = 150
_BUDGET_TURNS = (
    "Name a primary colour. One word.",
    "Name another one. One word.",
    "And the last one? One word.",
    "Which of them do you like best? One sentence.",
)
_TEAMS = ("billing", "search", "login", "deploy")
_OWNERS = ("Priya", "Tom", "Wen", "Omar")
_STATUS = ("needs tests before Friday", "dashboard is slow on Mondays", "docs are out of date",
           "had two incidents this month")
#: What an agent was handed: status notes, with who owns what among them.
_NOTES = (
    *(f"The {team} {status}" for status in _STATUS[:2] for team in _TEAMS),
    *(f"{owner} owns the {team} code and reviews its changes" for team, owner in zip(_TEAMS, _OWNERS, strict=True)),
    *(f"The {team} {status}" for status in _STATUS[2:] for team in _TEAMS),
)


def _usd(amount: float | None) -> str:
    return "price unknown" if amount is None else f"${amount:.6f}"


def strategy_name(guard: tg.Guard) -> str:
    """The guard's context strategy as the meter line names it (``TailOnly`` ->
    ``tail-only``); ``no fitting`` when it has none."""
    fit = guard.fit
    strategy = getattr(fit, "strategy", None)
    if strategy is None:
        return "no fitting"
    return re.sub(r"(?<!^)(?=[A-Z])", "-", type(strategy).__name__).lower()


def meter_line(reply: tg.Reply, *, strategy: str, cache: bool, session_tokens: int,
               given: int | None = None) -> str:
    """One answer's meter: ``[in 41 · out 12 · tail-only · cache miss · $0.000000 ·
    session 53 tokens]``. ``given`` is how many messages the call was handed: when the
    strategy sent fewer, the line says how many it kept. ``cache`` says whether the
    guard has a cache at all; a stop reason other than ``stop`` is shown too."""
    usage = reply.usage
    # What the answer itself spared (a cache hit, an early stop), not what fitting did.
    by_answer = usage.saved_tokens - usage.context_saved_tokens - usage.scope_saved_tokens
    parts = [f"in {usage.input_tokens}" + (f" ({usage.cached_input_tokens} from KV)" if usage.cached_input_tokens
                                            else ""),
             f"out {usage.output_tokens}"]
    kept = len(reply.messages)
    parts.append(f"{strategy} kept {kept}/{given} msgs" if given is not None and kept < given else strategy)
    if cache:
        parts.append(f"cache hit, saved {by_answer} tokens" if reply.cached else "cache miss")
    parts.append("cost unknown" if usage.cost_usd is None else f"${usage.cost_usd:.6f}")
    if reply.stop_reason not in ("stop", "cache"):
        stop = f"{reply.stop_reason} stop" if reply.stop_reason == "repetition" else reply.stop_reason
        parts.append(stop + (f", saved ~{by_answer} tokens" if by_answer else ""))
    parts.append(f"session {session_tokens} tokens")
    return "[" + " · ".join(parts) + "]"


@contextlib.contextmanager
def loading(steps: int, *, show: bool = True) -> Iterator[Callable[[str, Callable[[], object]], None]]:
    """A tqdm bar over ``steps`` loading steps on stderr (none when not ``show``):
    ``step(name, load)`` runs one."""
    with tqdm(total=steps, desc="loading", unit="step", file=sys.stderr, leave=True, disable=not show,
              bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}") as bar:

        def step(name: str, load: Callable[[], object]) -> None:
            bar.set_postfix_str(name)
            load()
            bar.update()

        yield step
        bar.set_postfix_str("done")


class _Demo:
    def __init__(self, out: TextIO, progress: bool) -> None:
        self.out = out
        self.progress = progress
        self.ledger = tg.Ledger()
        rate = tg.accounting.Pricing()
        per_m_in = rate.cost(PRICED_AS, 1_000_000, 0, warn=False)
        per_m_out = rate.cost(PRICED_AS, 0, 1_000_000, warn=False)
        per_m_cached = rate.cost(PRICED_AS, 1_000_000, 0, 1_000_000, warn=False)
        self.price: tuple[float, float, float] | None = (
            None if per_m_in is None or per_m_out is None or per_m_cached is None
            else (per_m_in, per_m_out, per_m_cached)
        )
        self.prices = {_MODEL: self.price} if self.price is not None else None
        self.backend = tg.backends.BundledRunner()
        self.cache: ExactCache | None = None

    # -- output ------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def header(self, number: int, title: str) -> None:
        self.say()
        self.say(f"== {number}. {title} " + "=" * max(_WIDTH - len(title) - 8, 4))

    def quote(self, who: str, text: str) -> None:
        lines = text.strip().splitlines() or [""]
        wrapped = [w for line in lines for w in (textwrap.wrap(line, _WIDTH - 12) or [""])]
        self.say(f"{who:>9} > {wrapped[0]}")
        for line in wrapped[1:]:
            self.say(f"{'':>9}   {line}")

    def guard(self, **options: Any) -> tg.Guard:
        return tg.Guard(self.backend, ledger=self.ledger, prices=self.prices, **options)

    # -- the sections ------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        with loading(4, show=self.progress) as step:
            step("tokenizer gpt-4o (o200k_base)", lambda: tg.get_tokenizer("gpt-4o"))
            step("tokenizer gpt-4 (cl100k_base)", lambda: tg.get_tokenizer("gpt-4"))
            step(f"bundled model {_MODEL}", self.backend.warmup)
            step("exact cache (diskcache shards)", self._open_cache)
        runner = self.backend.runner
        self.say(f"loaded {_MODEL} ({runner.precision.name} on {runner.device}, context {runner.context_length:,} "
                 f"tokens) and the tokenizers in {time.perf_counter() - started:.1f} s")
        if self.price is not None:
            self.say(f"prices: the bundled model is free; this demo prices its tokens at {PRICED_AS}'s catalogue "
                     f"rate (${self.price[0]:g} in / ${self.price[1]:g} out per million tokens)")

    def _open_cache(self) -> None:
        self.cache = ExactCache()

    def counting(self) -> None:
        self.header(1, "Exact token counts, offline")
        texts = {"English": "Tokens are what you pay for, so count them exactly.",
                 "Chinese": "人工智能正在改变我们开发软件的方式。"}
        self.say(f"{'tokenizer':<24}" + "".join(f"{name:>10}" for name in texts) + "   chat of 2 messages")
        chat = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": texts["Chinese"] + " <|im_end|> stays plain text"}]
        for model in ("gpt-4o", "gpt-4", _MODEL):
            counts = "".join(f"{tg.count_tokens(text, model=model):>10}" for text in texts.values())
            self.say(f"{model:<24}{counts}   {tg.count_tokens(chat, model=model):>6} (chat template included)")
        for name, text in texts.items():
            self.say(f"  {name}: {text!r} ({len(text)} characters)")
        hostile = "spam " * 20_000_000  # 100 MB
        started = time.perf_counter()
        over = tg.get_tokenizer("gpt-4o").count_until(hostile, 4000)
        elapsed = (time.perf_counter() - started) * 1e3
        self.say(f"a 100 MB prompt against a 4,000-token cap: over the cap ({over:,} > 4,000) in {elapsed:.1f} ms, "
                 "without tokenizing it all")

    def chat(self) -> None:
        self.header(2, f"A metered chat, its history fitted into {_CHAT_CONTEXT_TOKENS} tokens")
        guard = self.guard(max_output_tokens=32, max_context_tokens=_CHAT_CONTEXT_TOKENS)
        session, total = "demo-chat", 0
        strategy = strategy_name(guard)
        for question in _CHAT_TURNS:
            history = guard.history.get(session)
            turn = {"role": "user", "content": question}
            whole = guard.tokenizer.count_messages([*history, turn])
            self.quote("user", question)
            reply = guard.chat(question, session=session)
            total += reply.usage.total_tokens
            self.quote("assistant", reply.text)
            self.say(" " * 12 + meter_line(reply, strategy=strategy, cache=False, session_tokens=total,
                                           given=len(history) + 1))
            if reply.usage.input_tokens < whole:
                self.say(" " * 12 + f"context: the whole history is {whole} tokens ({len(history) + 1} messages); "
                         f"{strategy} sent the newest {len(reply.messages)} in {reply.usage.input_tokens}, "
                         f"sparing {reply.usage.context_saved_tokens}")

    def caching(self) -> None:
        self.header(3, "An exact cache: the same question twice")
        guard = self.guard(max_output_tokens=32, cache=self.cache)
        total = 0
        for attempt in ("first", "again"):
            started = time.perf_counter()
            reply = guard.complete(_CACHED_QUESTION, session="demo-cache")
            elapsed = time.perf_counter() - started
            total += reply.usage.total_tokens
            self.quote("user", f"{_CACHED_QUESTION} ({attempt})")
            self.quote("assistant", reply.text)
            self.say(" " * 12 + meter_line(reply, strategy=strategy_name(guard), cache=True, session_tokens=total))
            if reply.cached:
                saved = "" if reply.usage.saved_usd is None else f" (${reply.usage.saved_usd:.6f})"
                self.say(" " * 12 + f"cache hit: answered in {elapsed * 1e3:.1f} ms without the model, 0 tokens "
                         f"billed, {reply.usage.saved_tokens} tokens saved{saved}")
            else:
                self.say(" " * 12 + f"cache miss: the model answered in {elapsed:.2f} s; the answer is stored")

    def repetition(self) -> None:
        self.header(4, "A looping generation, stopped")
        guard = self.guard(max_output_tokens=_LOOP_CAP)
        started = time.perf_counter()
        reply = guard.complete(_LOOPING_PROMPT, session="demo-loop")
        elapsed = time.perf_counter() - started
        self.quote("user", f"{_LOOPING_PROMPT} (max_output_tokens={_LOOP_CAP})")
        self.quote("assistant", reply.text)
        self.say(" " * 12 + meter_line(reply, strategy=strategy_name(guard), cache=False,
                                       session_tokens=reply.usage.total_tokens))
        if reply.stop_reason == "repetition":
            self.say(" " * 12 + f"repetition stop: the loop was cut after {reply.usage.output_tokens} of "
                     f"{_LOOP_CAP} tokens ({elapsed:.1f} s); about {reply.usage.saved_tokens} tokens spared, "
                     "one copy kept in the reply")
        else:
            self.say(" " * 12 + f"no loop this time: the model stopped by itself ({reply.stop_reason})")

    def budget(self) -> None:
        self.header(5, f"A budget of {_BUDGET_TOKENS} tokens per session")
        budget = tg.Budget(tokens=_BUDGET_TOKENS, per="session")
        guard = self.guard(max_output_tokens=32, budget=budget)
        session, total = "demo-budget", 0
        for question in _BUDGET_TURNS:
            left = budget.remaining(session=session)["tokens"]
            self.quote("user", f"{question}   ({left:.0f} tokens left)")
            try:
                reply = guard.chat(question, session=session)
            except tg.BudgetExceeded as refusal:
                self.say(" " * 12 + f"BudgetExceeded, before the model ran: {refusal}")
                self.say(" " * 12 + "(a call reserves its exact input plus max_output_tokens=32 before the model "
                         "runs, then settles to what it used)")
                return
            total += reply.usage.total_tokens
            self.quote("assistant", reply.text)
            self.say(" " * 12 + meter_line(reply, strategy=strategy_name(guard), cache=False, session_tokens=total))
        self.say(" " * 12 + "the budget was never reached")

    def nested(self) -> None:
        self.header(6, "A nested call: the child gets only the context it needs")
        child = self.guard(max_output_tokens=24)
        notes = [{"role": "user", "content": f"Note {i}: {line}."} for i, line in enumerate(_NOTES, 1)]
        request = {"role": "user", "content": "Plan this week's reviews."}
        task = {"role": "user", "content": "According to the notes, who owns the billing code? Reply with the "
                                           "person's name only."}
        seen: dict[str, Any] = {}

        @tg.guard(model=_MODEL, ledger=self.ledger, prices=self.prices)
        def plan(messages: list[dict[str, Any]], max_tokens: int) -> str:
            # An agent step (your code) that forwards all it was given, plus its own question.
            forwarded = [*messages, task]
            seen["handed"] = child.tokenizer.count_messages(forwarded)
            seen["given"] = len(forwarded)
            seen["reply"] = reply = child.complete(forwarded, session="demo-nested")
            return f"Billing reviews go to: {reply.text.strip()}"

        answer = plan([*notes, request], session="demo-nested")
        parent = tg.reply_of(answer).usage
        reply: tg.Reply = seen["reply"]
        self.say(f"parent (depth {parent.depth}): {parent.input_tokens} input tokens ({len(notes)} notes and a "
                 "request); it forwards them all, with its own question, to a model call")
        self.say(f"child  (depth {reply.usage.depth}): handed {seen['handed']} tokens ({seen['given']} messages), "
                 f"sent {reply.usage.input_tokens} ({len(reply.messages)} messages): its own question and the "
                 f"forwarded notes most relevant to it, within 1/4 of the parent's input; "
                 f"{reply.usage.scope_saved_tokens} tokens spared")
        for message in reply.messages:
            if message.get("content") != task["content"]:
                self.say(f"{'':>12}kept: {message.get('content')}")
        self.quote("user", task["content"])
        self.quote("child", reply.text)
        self.quote("parent", str(answer))

    def report(self) -> None:
        self.header(7, "The ledger's cost report, by session")
        report = self.ledger.report(by="session")
        self.say(report.to_text().rstrip())
        saved = ", ".join(f"{entry['mechanism']} {entry['saved_tokens']} tokens ({_usd(entry['saved_usd'])})"
                          for entry in report.savings)
        self.say(f"saved by mechanism: {saved}")
        self.say(f"{report.totals['calls']} calls, one ledger row each; for a ledger file, "
                 "tokenguard report usage.sqlite --by session prints the same table")


def run(out: TextIO | None = None, *, progress: bool = True) -> int:
    """Run the whole demo, printing to ``out`` (default: stdout) and the loading bar to
    stderr (``progress=False``: none); returns 0."""
    demo = _Demo(out or sys.stdout, progress)
    started = time.perf_counter()
    demo.say(f"tokenguard demo: every call below runs on the bundled {_MODEL}, offline, and is metered")
    demo.load()
    try:
        for section in (demo.counting, demo.chat, demo.caching, demo.repetition, demo.budget, demo.nested,
                        demo.report):
            section()
    finally:
        if demo.cache is not None:
            demo.cache.close()
        demo.backend.close()
    demo.say()
    demo.say(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0
