"""The @tokenguard.guard decorator around the official OpenAI client.

Your own function calls `client.chat.completions.create(...)` as usual; the decorator
counts its prompt exactly before the call, refuses what does not fit (an input cap, a
budget per user), hands the function its output cap as `max_tokens`, and meters every
call in a ledger. The function still returns the OpenAI `ChatCompletion`;
`tg.reply_of(completion)` gives the guard's view of it (usage, cost, stop reason).

It talks to any OpenAI-compatible server (vLLM, TGI, llama.cpp server, Ollama, or
OpenAI itself), given by its base URL:

    .venv/bin/python examples/openai_decorator.py --base-url http://127.0.0.1:8000/v1
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 .venv/bin/python examples/openai_decorator.py

`--model` is the model the server serves (default gpt-4o-mini); the guard counts and
prices with that name, so for a model tokenguard has no tokenizer for, pass
`--tokenizer` (an OpenAI model name, an encoding such as o200k_base, or a path to a
tokenizer.json or .gguf). The API key comes from OPENAI_API_KEY (`--api-key`); local
servers accept any. Needs the `openai` package (`pip install openai`).
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

import tokenguard as tg

QUESTIONS = [
    ("alice", "What is PagedAttention? One sentence."),
    ("alice", "And continuous batching? One sentence."),
    ("bob", "Why do chat histories get expensive? One sentence."),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                        help="the server's OpenAI-compatible base URL, ending in /v1 (default: $OPENAI_BASE_URL)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model the server serves (default: gpt-4o-mini)")
    parser.add_argument("--tokenizer", help="what to count with when tokenguard does not know --model")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "sk-local"),
                        help="default: $OPENAI_API_KEY, else a placeholder that local servers accept")
    parser.add_argument("--max-tokens", type=int, default=64, help="the output cap of every call (default: 64)")
    args = parser.parse_args(argv)
    if not args.base_url:
        parser.error("give the server's base URL: --base-url http://127.0.0.1:8000/v1 or OPENAI_BASE_URL=...")

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    ledger = tg.Ledger()  # in memory; tg.Ledger("usage.sqlite") keeps it in a file

    @tg.guard(
        model=args.model,
        tokenizer=args.tokenizer,
        ledger=ledger,
        max_input_tokens=4_000,            # a longer prompt is refused before the server sees it
        max_output_tokens=args.max_tokens,  # handed to the function as max_tokens
        budget=tg.Budget(tokens=10_000, per="user", window="day"),
    )
    def ask(messages, max_tokens):
        # The function you already have: the guard only adds the checks and the metering around it.
        return client.chat.completions.create(model=args.model, messages=messages, max_tokens=max_tokens)

    print(f"server: {args.base_url} (model {args.model})")
    for user, question in QUESTIONS:
        completion = ask(question, user=user)  # a prompt string is sent as one user message
        reply = tg.reply_of(completion)
        usage = reply.usage
        cost = "cost unknown" if usage.cost_usd is None else f"${usage.cost_usd:.6f}"
        print(f"{user:>5} > {question}")
        print(f"model > {completion.choices[0].message.content}")
        print(f"        [in {usage.input_tokens} · out {usage.output_tokens} · {reply.stop_reason} · {cost} · "
              f"finish_reason={completion.choices[0].finish_reason}]")

    print()
    print(ledger.report(by="user").to_text().rstrip())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (tg.TokenGuardError, openai.OpenAIError) as error:  # a refusal, or the server failing
        sys.exit(f"error: {type(error).__name__}: {error}")
