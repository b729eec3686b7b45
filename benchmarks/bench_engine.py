"""Serving throughput of the bundled runner's engine, and session KV reuse.

    python benchmarks/bench_engine.py                 # 32 requests x 128 tokens, as in the issue
    python benchmarks/bench_engine.py --requests 8 --max-tokens 32 --skip-transformers   # a quick look

1) 32 concurrent requests of mixed prompt lengths, 128 greedy new tokens each (EOS
   ignored by asking for no stop token): aggregate generated tokens/s of the engine,
   against (a) the same requests one at a time through the same engine and (b)
   transformers ``generate`` with a padded static batch of all requests.
2) A 10-turn chat: prefill tokens and wall time with and without session KV reuse.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time

import torch

from tokenguard.runner import LlamaRunner
from tokenguard.tokens import default_model_path

TOPICS = ["paged attention", "continuous batching", "rotary embeddings", "grouped-query attention",
          "speculative decoding", "KV cache quantization", "tokenizers", "RMSNorm"]


def make_prompts(runner: LlamaRunner, count: int) -> list[list[int]]:
    """Chat prompts from about 30 to about 400 tokens."""
    prompts = []
    for i in range(count):
        detail = " Explain every step and give an example." * (i % 8) * 4
        messages = [{"role": "user", "content": f"Teach me about {TOPICS[i % len(TOPICS)]}.{detail}"}]
        prompts.append(runner.tokenizer.encode_chat(messages))
    return prompts


def engine_concurrent(runner: LlamaRunner, prompts: list[list[int]], max_tokens: int) -> float:
    results = [0] * len(prompts)

    def work(i: int) -> None:
        results[i] = len(runner.generate(prompts[i], max_tokens=max_tokens).token_ids)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.perf_counter() - start)


def engine_sequential(runner: LlamaRunner, prompts: list[list[int]], max_tokens: int) -> float:
    start = time.perf_counter()
    generated = sum(len(runner.generate(p, max_tokens=max_tokens).token_ids) for p in prompts)
    return generated / (time.perf_counter() - start)


def transformers_static_batch(prompts: list[list[int]], max_tokens: int) -> float:
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])  # left padding
    attention = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - longest) * len(prompts) / elapsed


def chat_session(runner: LlamaRunner, turns: int, reuse: bool) -> tuple[list[int], float]:
    """Prefill tokens of each turn, and the total wall time."""
    session = f"bench-{reuse}-{time.monotonic()}" if reuse else None
    messages: list[dict[str, str]] = []
    prefills = []
    start = time.perf_counter()
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn + 1}: tell me one fact about {TOPICS[turn % 8]}."})
        reply = runner.chat(messages, max_tokens=32, session=session)
        prefills.append(reply.prompt_tokens - reply.cached_prompt_tokens)
        messages.append({"role": "assistant", "content": reply.text})
    if session:
        runner.end_session(session)
    return prefills, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    runner = LlamaRunner(dtype=args.dtype)
    runner.stop_token_ids = frozenset()  # every request decodes exactly max_tokens
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {runner.device}, runner precision {runner.precision.name}")
    prompts = make_prompts(runner, args.requests)
    print(f"{len(prompts)} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_tokens} new tokens each\n")
    runner.generate(prompts[0], max_tokens=4)  # warm up

    concurrent = engine_concurrent(runner, prompts, args.max_tokens)
    print(f"engine, {len(prompts)} concurrent       : {concurrent:8.1f} tok/s")
    sequential = engine_sequential(runner, prompts, args.max_tokens)
    print(f"engine, one at a time          : {sequential:8.1f} tok/s   -> concurrent is "
          f"{concurrent / sequential:.2f}x (target >= 3x)")
    if not args.skip_transformers:
        static = transformers_static_batch(prompts, args.max_tokens)
        print(f"transformers, static batch fp32: {static:8.1f} tok/s   -> engine is "
              f"{concurrent / static:.2f}x (target >= 1.5x)")
    print(f"engine stats: {runner.stats()}\n")

    cold, cold_time = chat_session(runner, args.turns, reuse=False)
    warm, warm_time = chat_session(runner, args.turns, reuse=True)
    print(f"{args.turns}-turn chat, prefill tokens per turn")
    print(f"  without session reuse: {cold}  total {sum(cold)}, {cold_time:.2f} s")
    print(f"  with session reuse   : {warm}  total {sum(warm)}, {warm_time:.2f} s")
    print(f"  turn {args.turns} prefill cut by {(1 - warm[-1] / cold[-1]) * 100:.0f}% (target >= 80%)")
    runner.close()


if __name__ == "__main__":
    main()
