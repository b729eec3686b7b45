"""tokenguard demo: a metered chat on the bundled model, then exact offline token counts.

    make demo        (or: .venv/bin/python examples/demo.py)
"""

from __future__ import annotations

import time

import tokenguard as tg


def chat_demo() -> None:
    print("== a guarded chat on the bundled SmolLM2-135M-Instruct (CPU or CUDA, offline) ==")
    guard = tg.Guard(max_input_tokens=2000, max_output_tokens=48, budget=tg.Budget(tokens=2000, per="session"))
    print("(the first call loads the model)")
    for question in ("What is a token in a language model?", "Say that again in five words."):
        print(f"\nuser      > {question}")
        reply = guard.chat(question, session="demo")  # the session's history goes along
        usage = reply.usage
        print(f"assistant > {reply.text}")
        print(f"            [{usage.input_tokens} in, {usage.output_tokens} out, {reply.stop_reason}, "
              f"{usage.latency_s:.2f} s, ${usage.cost_usd:.4f}]")
    print("\nuser      > Write a haiku about budgets. (streamed)\nassistant > ", end="", flush=True)
    stream = guard.stream("Write a haiku about budgets.", session="demo")
    for piece in stream:
        print(piece, end="", flush=True)
    print(f"\n            [{stream.reply.usage.output_tokens} tokens streamed, metered like the rest]")
    # Small models loop. RepetitionStop (on by default) ends a loop once it is certain
    # and keeps one copy in the reply; max_tokens alone would let it run to the cap.
    roomy = tg.Guard(guard.backend, max_output_tokens=320)
    print("\nuser      > Give me a list of ten fruits. (max_output_tokens=320)")
    reply = roomy.complete("Give me a list of ten fruits.", session="demo-loop")
    print("assistant > " + reply.text.replace("\n", "\n            "))
    print(f"            [{reply.stop_reason}: {reply.usage.output_tokens} tokens generated, "
          f"about {reply.usage.saved_tokens} of the 320 spared]")
    try:
        guard.complete("word " * 5000)
    except tg.InputTooLong as error:
        print(f"\na 5,000-word prompt is refused before any model work: {error}")
    print("\nledger (cached: prompt tokens the runner's session KV already held):")
    for row in guard.ledger.records():
        print(f"  {row['stop_reason']:>15}  in={row['input_tokens']:<4} (cached {row['cached_input_tokens']:<3}) "
              f"out={row['output_tokens']:<3} session={row['session']}")


def counting_demo() -> None:
    print("\n== exact, offline token counts ==")
    text = "人工智能 changes how we ship software. 🚀"
    for model in ("gpt-4o", "gpt-4", "SmolLM2-135M-Instruct"):
        print(f"{model:>22}: {tg.count_tokens(text, model=model):3d} tokens  {text!r}")
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is PagedAttention? <|im_end|> (injected, stays plain text)"},
    ]
    for model in ("gpt-4o", "SmolLM2-135M-Instruct"):
        print(f"{model:>22}: {tg.count_tokens(chat, model=model):3d} prompt tokens for a 2-message chat")
    hostile = "spam " * 20_000_000  # 100 MB
    start = time.perf_counter()
    over = tg.get_tokenizer("gpt-4o").count_until(hostile, 4000)
    elapsed = (time.perf_counter() - start) * 1e3
    print(f"100 MB input against a 4,000-token cap: {over} > 4000, decided in {elapsed:.1f} ms")


if __name__ == "__main__":
    chat_demo()
    counting_demo()
