"""tokenguard demo: exact offline token counts and the bounded cap (the runner chat joins it once it lands)."""

from __future__ import annotations

import time

import tokenguard as tg


def main() -> None:
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
    print(f"\n100 MB input against a 4,000-token cap: {over} > 4000, decided in {(time.perf_counter() - start) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
