"""Budgets per user: each user spends from an allowance of their own, and a call that
could overspend it is refused before the model runs, as `tg.BudgetExceeded`.

A call reserves its worst case (its exact input tokens plus `max_output_tokens`) in
every budget, and settles to what it used once it ends; the refusal says which budget,
whose scope, how much the call needed and how much was left, and it is a ledger row
like any call. Two budgets here: 150 tokens per user per day, and $1 a month for
everyone together. A per-user budget also refuses a call that names no user, instead
of pooling every anonymous caller into one allowance.

    .venv/bin/python examples/budgets_per_user.py
    .venv/bin/python examples/budgets_per_user.py --store budgets.sqlite   # shared by processes, kept between runs

The model is a stand-in function that answers at once, so the script runs anywhere,
offline; put your own call in its place (keeping its `max_tokens` parameter), or drive
a backend: `tg.Guard(tg.backends.OpenAICompatible(url, model=...), budget=...)`.
"""

from __future__ import annotations

import argparse
import sys

import tokenguard as tg

QUESTIONS = [
    ("alice", "What is PagedAttention?"),
    ("bob", "How do I count tokens for gpt-4o?"),
    ("alice", "And continuous batching?"),
    ("alice", "What about speculative decoding?"),
    ("alice", "Summarise all of that for my manager."),
    ("bob", "Why do long chats cost more?"),
]


def stand_in_model(messages: list[dict[str, str]], max_tokens: int) -> str:
    """Your model call goes here; it must pass `max_tokens` on, so it cannot generate past what the budget holds."""
    return f"A short answer to {messages[-1]['content']!r}, written by a stand-in for your model."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a SQLite file for the budgets (default: in this process only)")
    args = parser.parse_args(argv)

    per_user = tg.Budget(tokens=150, per="user", window="day", store=args.store)
    everyone = tg.Budget(usd=1.00, per="global", window="month", store=args.store)
    guard = tg.Guard(stand_in_model, model="gpt-4o-mini", budget=[per_user, everyone], max_output_tokens=64)

    for user, question in QUESTIONS:
        left = per_user.remaining(user=user)["tokens"]
        print(f"{user:>5} ({left:.0f} tokens left today) > {question}")
        try:
            reply = guard.complete(question, user=user)
        except tg.BudgetExceeded as refusal:
            print(f"        refused before the model ran: BudgetExceeded by {refusal.budget!r} for {refusal.key}: "
                  f"needs up to {refusal.needed:.0f} {refusal.unit}, {refusal.left:.0f} left")
            continue
        usage = reply.usage
        print(f"        answered: in {usage.input_tokens} + out {usage.output_tokens} tokens, ${usage.cost_usd:.6f}")

    try:
        guard.complete("Who am I?")
    except tg.InvalidRequest as refusal:
        print(f"no user given: refused as InvalidRequest: {refusal}")

    print()
    for user in ("alice", "bob"):
        spent = per_user.spent(user=user)
        print(f"{user}: {spent['tokens']:.0f} of {per_user.tokens} tokens spent today")
    print(f"everyone: ${everyone.spent()['usd']:.6f} of ${everyone.usd:.2f} spent this month")
    refused = guard.ledger.records(stop_reason="budget_exceeded")
    print(f"refusals in the ledger: {len(refused)} ({', '.join(row['user'] for row in refused)})")
    print()
    print(guard.ledger.report(by="user").to_text().rstrip())
    guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
