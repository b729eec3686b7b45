"""Decode speed of the bundled runner when other torch work shares the caller's process.

    python benchmarks/bench_isolation.py                 # 3 rounds, ~6 minutes on 2 cores
    python benchmarks/bench_isolation.py --rounds 1 --new-tokens 32

With OpenMP, every OS thread that ran parallel torch work keeps a worker pool until it
exits; once a process's pooled workers outnumber the cores, every pool stops spinning
between parallel regions and the engine (thousands of small regions per token) pays a
wake-up on each. ``LlamaRunner`` therefore runs its engine in a process of its own.

Three situations, SmolLM2-135M int4 (the default), greedy, ``--new-tokens`` decoded
(end-of-sequence ignored), each measured in a fresh Python process:

* alone: a runner alone;
* after matmuls: the main thread first ran ten 512x512 matrix products (parallel torch work);
* two runners: a float32 runner and the int4 one in the same process (both warmed), int4 measured.

Each is measured for the runner as shipped (engine in its own process, through
``LlamaRunner.generate``) and for the engine in a thread of the caller's process, as
``LlamaRunner`` ran it before (an ``Engine`` driven directly). Printed: decode tok/s (the
best of the rounds) and the ratio to alone in the same mode. Target: every situation
>= 0.9x alone for the engine process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tokenguard.runner import LlamaRunner, SamplingParams
from tokenguard.runner.engine_process import EngineRecipe
from tokenguard.tokens import default_model_path, get_tokenizer

PROMPT = "Explain, step by step, how a paged key-value cache lets a serving engine batch many requests at once."
SITUATIONS = ("alone", "after matmuls", "two runners")
MODES = {"process": "engine process (LlamaRunner)", "thread": "engine thread (before)"}

Generate = Callable[[list[int], int], int]  # (prompt ids, new tokens) -> tokens generated


def process_runner(path: Path, dtype: str) -> Generate:
    runner = LlamaRunner(path, device="cpu", dtype=dtype)
    runner.stop_token_ids = frozenset()  # every request decodes exactly what it asks

    def generate(ids: list[int], n: int) -> int:
        return len(runner.generate(ids, max_tokens=n).token_ids)

    return generate


def thread_engine(path: Path, dtype: str) -> Generate:
    engine = EngineRecipe(path, dtype, "cpu").start_engine()

    def generate(ids: list[int], n: int) -> int:
        events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        engine.submit(ids, SamplingParams(max_tokens=n), frozenset(), events.put)
        count = 0
        while True:
            kind, value = events.get()
            if kind == "token":
                count += 1
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return count

    return generate


def matmuls_on_this_thread() -> None:
    """Ten 512x512 products: parallel torch work, leaving an OpenMP pool on this thread."""
    a = torch.randn(512, 512)
    for _ in range(10):
        a = (a @ a).tanh()


def decode_tok_s(generate: Generate, ids: list[int], new_tokens: int, runs: int) -> float:
    """Decode tok/s: (one request of new_tokens + 1) minus (one of 1), best of runs each."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        assert generate(ids, n) == n
        return time.perf_counter() - start

    timed(2)
    prefill_s = min(timed(1) for _ in range(runs + 1))
    total_s = min(timed(new_tokens + 1) for _ in range(runs))
    return new_tokens / max(total_s - prefill_s, 1e-9)


def measure(situation: str, mode: str, new_tokens: int, runs: int) -> float:
    """One cell, in this (fresh) process."""
    path = default_model_path()
    ids = get_tokenizer(str(path)).encode(PROMPT)
    make = process_runner if mode == "process" else thread_engine
    target = make(path, "int4")
    if situation == "two runners":
        other = make(path, "float32")
        other(ids, 4)
    if situation == "after matmuls":
        matmuls_on_this_thread()
    return decode_tok_s(target, ids, new_tokens, runs)


def run_cell(situation: str, mode: str, new_tokens: int, runs: int) -> float:
    """``measure`` in a fresh interpreter: no OpenMP pool left over from another cell."""
    out = subprocess.run([sys.executable, __file__, "--cell", situation, mode, "--new-tokens", str(new_tokens),
                          "--runs", str(runs)], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tok_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="every cell is measured once per round; best kept")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed requests per measurement; the best is kept")
    parser.add_argument("--modes", default="process,thread")
    parser.add_argument("--cell", nargs=2, metavar=("SITUATION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps({"tok_s": measure(*args.cell, args.new_tokens, args.runs)}))
        return

    modes = args.modes.split(",")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"workload: SmolLM2-135M int4, greedy, {args.new_tokens} new tokens, batch 1; best of {args.runs} "
          f"per process, best of {args.rounds} rounds (cells interleaved)\n")
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for situation in SITUATIONS:
            for mode in modes:
                tok_s = run_cell(situation, mode, args.new_tokens, args.runs)
                results.setdefault((situation, mode), []).append(tok_s)
                print(f"  round {round_ + 1}: {situation:14s} {MODES[mode]:29s} {tok_s:6.1f} tok/s", flush=True)
    print()
    print(f"{'situation':14s}" + "".join(f" {MODES[m]:>29s} {'x alone':>8s}" for m in modes))
    for situation in SITUATIONS:
        row = f"{situation:14s}"
        for mode in modes:
            best = max(results[(situation, mode)])
            alone = max(results[("alone", mode)])
            row += f" {best:23.1f} tok/s {best / alone:7.2f}x"
        print(row)
    print("(target: every situation >= 0.90x alone with the engine process)")


if __name__ == "__main__":
    main()
