"""Context strategies compared: one long chat fitted into a small window by
`TailOnly`, `Summary` and `Retrieval`, with what each sent, spared and remembered.

The chat opens with a fact (a locker code), goes on for many turns about other things,
then asks for the fact. Each strategy fits the history into the same budget
(`max_context_tokens`), exactly, with the chat template counted:

- `TailOnly` keeps the newest turns: the cheapest, and it forgets the fact;
- `Summary` folds older turns into a running summary, here written by a function of
  your own (a cheap model in practice; with `summarizer=None` the guard's own model
  writes it, metered as a call tagged "summary");
- `Retrieval` recalls the older turns the question points at (embeddings in FAISS
  plus BM25; needs `pip install "tokenguard[retrieval]"`).

Every call is a ledger row; the report at the end shows the prompt tokens each strategy
spared (`context` savings) beside what it spent.

    .venv/bin/python examples/strategies_compared.py
    .venv/bin/python examples/strategies_compared.py --budget 300 --turns 80

The model is a stand-in function that answers from what it was sent, so the script
runs anywhere, offline, and shows whether the fact reached it; put your own model call
in its place (keeping its `max_tokens` parameter).
"""

from __future__ import annotations

import argparse
import re
import sys

import tokenguard as tg

FACT = "My locker code at the gym is 4417."
QUESTION = "What is my gym locker code?"


def chat_history(turns: int) -> list[dict[str, str]]:
    """A long chat: the fact first, then ``turns`` exchanges about other things, then the question."""
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": FACT}, {"role": "assistant", "content": "Noted, I will remember it."}]
    for i in range(turns):
        history.append({"role": "user", "content": f"Give me one idea for a weekend project, number {i}."})
        history.append({"role": "assistant", "content": f"Idea {i}: build a small weather station with a "
                                                         f"microcontroller and log reading {i} every hour."})
    return [*history, {"role": "user", "content": QUESTION}]


def stand_in_model(messages: list[dict[str, str]], max_tokens: int) -> str:
    """Your model call goes here. This one answers from what it was sent."""
    sent = " ".join(str(message.get("content") or "") for message in messages)
    code = re.search(r"locker code at the gym is (\d+)", sent)
    return f"Your locker code is {code.group(1)}." if code else "I don't know your locker code."


def keep_first_person(text: str) -> str:
    """A summarizer of your own: keep the user's lines that say something about them.
    (In practice a cheap model; any `fn(text) -> str` works.)"""
    lines = [line for line in text.splitlines() if re.search(r"\b(my|I)\b", line, re.IGNORECASE)]
    return " ".join(lines)[:400] or "Nothing personal was said."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=250, help="max_context_tokens for every strategy")
    parser.add_argument("--turns", type=int, default=60, help="exchanges between the fact and the question")
    args = parser.parse_args(argv)

    history = chat_history(args.turns)
    ledger = tg.Ledger()
    strategies = {
        "TailOnly": tg.context.TailOnly(),
        "Summary": tg.context.Summary(summarizer=keep_first_person, keep_recent_tokens=100),
        "Retrieval": tg.context.Retrieval(keep_recent_tokens=100),
    }
    whole = tg.get_tokenizer("gpt-4o-mini").count_messages(history)
    print(f"the chat: {len(history)} messages, {whole} tokens; each strategy fits it into {args.budget}\n")
    print(f"{'strategy':<10} {'sent':>5} {'spared':>7} {'msgs':>5}  answer")
    for name, strategy in strategies.items():
        guard = tg.Guard(stand_in_model, model="gpt-4o-mini", context=strategy, max_context_tokens=args.budget,
                         ledger=ledger, max_output_tokens=32)
        reply = guard.complete(history, tags=name)
        usage = reply.usage
        print(f"{name:<10} {usage.input_tokens:>5} {usage.context_saved_tokens:>7} {len(reply.messages):>5}  "
              f"{reply.text}")

    print()
    print(ledger.report(by="tag").to_text())
    for entry in ledger.report().savings:
        print(f"saved by {entry['mechanism']}: {entry['saved_tokens']} tokens, ${entry['saved_usd']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
