"""Context strategies: what each keeps of a long conversation, and what it costs.

    .venv/bin/python benchmarks/bench_context.py [--turns 10000] [--no-summary] [--seeds 3]

1. Recall: a generated conversation of 320 turns with 40 planted facts
   (``context_facts.py``) and later questions about them, half reworded. For each
   strategy at budgets of 512, 1024 and 2048 tokens (the bundled model's tokenizer and
   chat template): the share of questions whose evidence is in the fitted prompt,
   tokens sent, time per fit. The baseline is a plain dense top-k pack (MiniLM + FAISS
   flat: the system message, the k turns nearest to the question in their order, the
   question; no tail, no words, no neighbours). Target: Retrieval keeps the evidence
   for at least 90% of the questions at 1024 tokens and beats the baseline. Summary
   asks the bundled model for its summaries (``--no-summary`` skips it: slow on CPU).
2. Tail-only fit time against LangChain's ``trim_messages`` on a long history: both
   keep the newest messages that fit, counted with the same tokenizer (gpt-4o's).
   Target: at least 50x faster, as many messages or more, within budget.
   ``langchain-core`` is a benchmark-only peer: ``make bench`` installs it.
3. The bundled runner's decode speed in the same process, before and after retrieval
   fits (embedding and FAISS work between turns).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
from context_facts import Conversation, conversation

import tokenguard as tg
from tokenguard.context import Retrieval, Summary, TailOnly
from tokenguard.context.embedder import as_embedder
from tokenguard.context.vectors import flat_index

BUDGETS = (512, 1024, 2048)


def history(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a terse assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: what is {i} times {i + 1}? 人工智能 🚀"})
        messages.append({"role": "assistant", "content": f"{i * (i + 1)}, as {i} x {i + 1} says."})
    messages.append({"role": "user", "content": "And the last one?"})
    return messages


def per_fit_ms(fit: Callable[[], object], repeats: int) -> float:
    fit()  # the first fit of a session: later turns find their counts remembered
    start = time.perf_counter()
    for _ in range(repeats):
        fit()
    return (time.perf_counter() - start) / repeats * 1e3


class DenseTopK:
    """The baseline: the system message, the ``k`` older messages nearest to the
    question (MiniLM, a flat FAISS index), in their order, and the question; as many
    of those k as fit."""

    def __init__(self, k: int = 8) -> None:
        self.k = k
        self.embed = as_embedder(None)
        self._vectors: dict[str, np.ndarray] = {}

    def fit(self, messages: list[dict], max_tokens: int, tokenizer: tg.Tokenizer) -> list[dict]:
        system, older, question = messages[:1], messages[1:-1], messages[-1]
        new = [m["content"] for m in older if m["content"] not in self._vectors]
        if new:
            self._vectors.update(zip(new, self.embed(new), strict=True))
        index = flat_index(self._vectors[older[0]["content"]].shape[0])
        index.add(np.stack([self._vectors[m["content"]] for m in older]))
        _, rows = index.search(self.embed([question["content"]]), self.k)
        kept: list[int] = []
        for row in rows[0]:
            trial = sorted([*kept, int(row)])
            if tokenizer.count_messages([*system, *(older[i] for i in trial), question]) <= max_tokens:
                kept = trial
        return [*system, *(older[i] for i in kept), question]


def recall_table(conv: Conversation, strategies: dict[str, object], tokenizer: tg.Tokenizer) -> None:
    print(f"  {'strategy':<14}{'budget':>7}{'evidence kept':>15}{'tokens sent':>13}{'ms per fit':>12}")
    for budget in BUDGETS:
        for name, strategy in strategies.items():
            kept = sent = 0
            elapsed = 0.0
            for question in conv.questions:
                messages = [*conv.messages[: question.position], {"role": "user", "content": question.text}]
                start = time.perf_counter()
                fitted = strategy.fit(messages, budget, tokenizer)  # type: ignore[attr-defined]
                elapsed += time.perf_counter() - start
                kept += question.answer in "\n".join(str(m.get("content")) for m in fitted)
                sent += tokenizer.count_messages(fitted)
            n = len(conv.questions)
            print(f"  {name:<14}{budget:>7}{kept / n:>14.0%} {sent // n:>12}{elapsed / n * 1e3:>12.1f}")


class _Summarizer:
    """Summary's model calls through a guard on the bundled model (greedy, metered)."""

    def __init__(self, guard: tg.Guard) -> None:
        self.guard = guard

    def __call__(self, messages: list[dict], max_tokens: int, backend: object, tag: str) -> str:
        return self.guard.complete(messages, max_tokens=max_tokens, tags=tag, temperature=0.0).text


class _GuardedSummary:
    def __init__(self, guard: tg.Guard) -> None:
        self.summary = Summary(keep_recent_tokens=256, max_summary_tokens=192)
        self.generate = _Summarizer(guard)

    def fit(self, messages: list[dict], max_tokens: int, tokenizer: tg.Tokenizer) -> list[dict]:
        return self.summary.fit(messages, max_tokens, tokenizer, session=str(max_tokens), generate=self.generate)


def decode_speed(runner: object, tokenizer: tg.Tokenizer, conv: Conversation) -> None:
    prompt = tokenizer.encode("Write a short story about a lighthouse keeper.")

    def tok_s() -> float:
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            out = runner.generate(prompt, max_tokens=64, temperature=0.0)  # type: ignore[attr-defined]
            best = max(best, len(out.token_ids) / (time.perf_counter() - start))
        return best

    runner.generate(prompt, max_tokens=8)  # type: ignore[attr-defined]  # warm-up
    before = tok_s()
    retrieval = Retrieval()
    for question in conv.questions[:5]:
        retrieval.fit([*conv.messages[: question.position], {"role": "user", "content": question.text}], 1024,
                      tokenizer)
    after = tok_s()
    print(f"  decode, 64 new tokens: {before:.0f} tok/s alone, {after:.0f} tok/s after retrieval fits in the same "
          f"process ({after / before:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="planted-fact conversations to measure recall on")
    parser.add_argument("--no-summary", action="store_true", help="skip Summary (it runs the bundled model)")
    args = parser.parse_args()

    from tokenguard.runner import LlamaRunner

    runner = LlamaRunner()
    bundled = runner.tokenizer
    guard = tg.Guard(runner, max_output_tokens=256)
    decode_speed(runner, bundled, conversation())
    for seed in range(args.seeds):
        conv = conversation(seed=seed)
        print(f"recall of planted facts: {len(conv.messages)} messages, {len(conv.questions)} questions "
              f"(seed {seed}; {bundled.name}'s chat template)")
        strategies: dict[str, object] = {"TailOnly": TailOnly(), "dense top-8": DenseTopK(), "Retrieval": Retrieval()}
        if not args.no_summary and seed == 0:
            strategies["Summary"] = _GuardedSummary(guard)
        recall_table(conv, strategies, bundled)

    tokenizer = tg.get_tokenizer("gpt-4o")
    messages = history(args.turns)
    print(f"tail-only fit of a {len(messages)}-message history ({platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()})")
    try:
        from langchain_core.messages import convert_to_messages, trim_messages
    except ImportError:
        trim_messages = None
        print("  langchain-core is not installed (make bench installs it): tokenguard only")
    else:
        lc_messages = convert_to_messages(messages)

        def lc_count(msgs: list) -> int:
            """The same accounting as tokenguard's, on LangChain's message objects."""
            roles = {"human": "user", "ai": "assistant", "system": "system"}
            return tokenizer.count_messages([{"role": roles[m.type], "content": m.content} for m in msgs])

        def lc_fit(budget: int) -> list:
            return trim_messages(lc_messages, max_tokens=budget, token_counter=lc_count, strategy="last",
                                 include_system=True, start_on="human")

    for budget in (512, 1024, 2048):
        strategy = TailOnly()
        ours = strategy.fit(messages, budget, tokenizer)
        ours_ms = per_fit_ms(lambda s=strategy, b=budget: s.fit(messages, b, tokenizer), args.repeats)
        line = (f"  budget {budget:>4}: TailOnly {ours_ms:8.2f} ms, {len(ours):3d} messages, "
                f"{tokenizer.count_messages(ours)} tokens")
        if trim_messages is not None:
            theirs = lc_fit(budget)
            theirs_ms = per_fit_ms(lambda b=budget: lc_fit(b), args.repeats)
            line += (f" | trim_messages {theirs_ms:8.2f} ms, {len(theirs):3d} messages, {lc_count(theirs)} tokens"
                     f" | {theirs_ms / ours_ms:6.0f}x faster")
        print(line)


if __name__ == "__main__":
    main()
