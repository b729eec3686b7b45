"""Single-stream speed and accuracy of the bundled runner against transformers (and llama.cpp).

For each precision mode of ``LlamaRunner`` (with its native decode step, and without it:
every decode step through PyTorch's operators) and for ``transformers`` ``generate`` on the
same GGUF: prefill tokens/s for one prompt, and decode tokens/s for 128 greedy new
tokens (end-of-sequence ignored, so every engine decodes the same count). Prints the
machine, the measured memory bandwidth and each mode's bandwidth roofline (weight bytes
read per decoded token), ratios against transformers float32, and each mode's accuracy
against the runner's float32 (teacher-forced: top-1 agreement and max logit difference).

    python benchmarks/bench_runner.py                    # everything, ~3 minutes on 2 cores
    python benchmarks/bench_runner.py --modes int4 --skip-transformers

llama.cpp (``llama-cpp-python``, which ``make bench`` installs; never a dependency of
tokenguard) is measured in rounds alternating with ``LlamaRunner.generate`` (``--rounds``),
each round's ratio printed and the best of each kept: on a shared machine either
one's speed drifts by tens of percent over minutes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from tokenguard.runner.generate import decode_one_token, prefill
from tokenguard.runner.model import (
    PRECISIONS,
    ContiguousKVCache,
    LlamaModel,
    build_model,
    load_checkpoint,
    resolve_device,
    resolve_model_path,
)
from tokenguard.tokens import get_tokenizer

PROMPT = (
    "PagedAttention stores the key-value cache of each sequence in fixed-size blocks that need not be "
    "contiguous in memory, much like virtual memory pages in an operating system. A block table maps "
    "the logical blocks of a sequence to physical blocks in a shared pool, so memory is allocated on "
    "demand and freed the moment a sequence finishes. Explain, step by step, how a serving engine uses "
    "this to batch many requests at once, how prefix sharing works with reference counts, and what "
    "happens when the pool runs out of free blocks during decoding."
)
ACCURACY_PROMPTS = [
    "The capital of France is",
    "def quicksort(items):",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
]


def best_of(runs: int, fn: Callable[[], float]) -> float:
    """The smallest of ``runs`` timings: the machine's speed with the least interference."""
    return min(fn() for _ in range(runs))


# -- machine ---------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth from summing a 512 MiB buffer (best of 5), in GB/s."""
    x = torch.ones(128 * 2**20, dtype=torch.float32, device=device)

    def once() -> float:
        sync(device)
        t = time.perf_counter()
        x.sum().item()
        return time.perf_counter() - t

    seconds = best_of(5, once)
    return x.numel() * 4 / seconds / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- the runner --------------------------------------------------------------------------


def weight_bytes_per_token(model: LlamaModel) -> int:
    """Bytes of weights one decode step reads: every layer and the lm_head (a tied one
    included: it is its own tensor here) plus one embedding row. The dense copies that
    quantized layers keep for batches of many rows are not read at batch 1."""
    total = sum(t.numel() * t.element_size()
                for name, t in [*model.named_parameters(), *model.named_buffers()]
                if name not in ("embed_tokens", "inv_freq") and not name.endswith(".dense"))
    embed = model.embed_tokens
    return total + embed.shape[1] * embed.element_size()


def time_runner(model: LlamaModel, prompt_ids: list[int], new_tokens: int, runs: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of greedy decoding through prefill/decode_one_token."""
    config, device = model.config, model.inv_freq.device
    ids = torch.tensor(prompt_ids, device=device)

    def new_cache() -> ContiguousKVCache:
        return ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                                 len(prompt_ids) + new_tokens + 1, model.dtype, device)

    def prefill_once() -> float:
        cache = new_cache()
        sync(device)
        t = time.perf_counter()
        prefill(model, ids, cache).argmax().item()
        return time.perf_counter() - t

    def decode_once() -> float:
        cache = new_cache()
        token = int(prefill(model, ids, cache).argmax())
        sync(device)
        t = time.perf_counter()
        for i in range(new_tokens):
            logits = decode_one_token(model, torch.tensor([token], device=device), len(prompt_ids) + i, cache)
            token = int(logits.argmax())
        return time.perf_counter() - t

    prefill_once()  # warm-up
    prefill_s = best_of(runs + 1, prefill_once)
    decode_s = best_of(runs, decode_once)
    return len(prompt_ids) / prefill_s, new_tokens / decode_s


@torch.inference_mode()
def teacher_forced_logits(model: LlamaModel, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    config, device = model.config, model.inv_freq.device
    cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                              len(prompt_ids) + len(continuation), model.dtype, device)
    rows = [prefill(model, torch.tensor(prompt_ids, device=device), cache)]
    for i, token in enumerate(continuation[:-1]):
        rows.append(decode_one_token(model, torch.tensor([token], device=device), len(prompt_ids) + i, cache))
    return torch.stack(rows).float().cpu()


def greedy_continuation(model: LlamaModel, prompt_ids: list[int], n: int) -> list[int]:
    config, device = model.config, model.inv_freq.device
    cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                              len(prompt_ids) + n, model.dtype, device)
    token = int(prefill(model, torch.tensor(prompt_ids, device=device), cache).argmax())
    out = [token]
    for i in range(n - 1):
        token = int(decode_one_token(model, torch.tensor([token], device=device), len(prompt_ids) + i, cache).argmax())
        out.append(token)
    return out


class PublicApi:
    """End to end through ``LlamaRunner().generate`` (default precision): whatever serving
    machinery sits behind the public API is included, the engine process too. EOS is not
    banned here, so decode tok/s is over the tokens actually generated."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from tokenguard.runner import LlamaRunner

        self.runner = LlamaRunner(path, device=device)
        self.mode = self.runner.precision.name

    def measure(self, prompt_ids: list[int], new_tokens: int, runs: int) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s), each the best of ``runs``."""
        counts: list[int] = []

        def generate(n: int) -> float:
            t = time.perf_counter()
            counts.append(len(self.runner.generate(prompt_ids, max_tokens=n).token_ids))
            return time.perf_counter() - t

        generate(2)
        prefill_s = best_of(runs + 1, lambda: generate(1))
        total_s = best_of(runs, lambda: generate(new_tokens + 1))
        return len(prompt_ids) / prefill_s, (counts[-1] - 1) / max(total_s - prefill_s, 1e-9)


# -- references ----------------------------------------------------------------------------


def time_transformers(path: Path, dtype: torch.dtype, device: torch.device, prompt_ids: list[int],
                      new_tokens: int, runs: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t

    generate(2)  # warm-up
    prefill_s = best_of(runs + 1, lambda: generate(1))
    total_s = best_of(runs, lambda: generate(new_tokens + 1))
    return len(prompt_ids) / prefill_s, new_tokens / max(total_s - prefill_s, 1e-9)


_llama_cpp: dict[Path, Any] = {}  # in the llama.cpp process: each model loaded once


def time_llama_cpp(path: Path, prompt_ids: list[int], new_tokens: int, runs: int,
                   banned: frozenset[int]) -> tuple[float, float] | None:
    """llama.cpp through llama-cpp-python's completion API; end-of-sequence ids banned."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    if path not in _llama_cpp:
        threads = os.cpu_count()
        _llama_cpp[path] = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new_tokens + 8, n_threads=threads,
                                 n_threads_batch=threads, verbose=False)
    llm = _llama_cpp[path]
    bias = {i: -1e9 for i in banned}

    def complete(n: int) -> float:
        llm.reset()  # no prompt reuse between runs
        t = time.perf_counter()
        llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, logit_bias=bias)
        return time.perf_counter() - t

    complete(2)
    prefill_s = best_of(runs + 1, lambda: complete(1))
    total_s = best_of(runs, lambda: complete(new_tokens + 1))
    return len(prompt_ids) / prefill_s, new_tokens / max(total_s - prefill_s, 1e-9)


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default=None, help="comma-separated precision modes (default: all for the device)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement; the best is kept")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of the public API and llama.cpp; the best of each is kept")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-public-api", action="store_true",
                        help="skip the end-to-end LlamaRunner.generate row")
    parser.add_argument("--transformers-dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    device = resolve_device(args.device)
    path = resolve_model_path(args.model)
    modes = args.modes.split(",") if args.modes else (
        list(PRECISIONS) if device.type == "cpu" else ["float32", "bfloat16", "float16"])
    tokenizer = get_tokenizer(str(path))
    prompt_ids = tokenizer.encode(PROMPT)
    bandwidth = memory_bandwidth_gbs(device)

    print(f"model      {path.name}")
    print(f"machine    {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        print(f"device     {torch.cuda.get_device_name(device)}")
    print(f"bandwidth  {bandwidth:.1f} GB/s (read, {device.type})")
    print(f"workload   prompt {len(prompt_ids)} tokens, then {args.new_tokens} greedy tokens, batch 1; "
          f"best of {args.runs}")
    print()

    config, weights = load_checkpoint(path)
    rows: list[tuple[str, float, float, float | None]] = []
    models: dict[str, LlamaModel] = {}
    for mode in modes:
        model = build_model(config, weights, PRECISIONS[mode], device)
        pf, dec = time_runner(model, prompt_ids, args.new_tokens, args.runs)
        mib = weight_bytes_per_token(model) / 2**20
        roofline = bandwidth * 1e9 / (mib * 2**20)
        rows.append((f"tokenguard {mode}", pf, dec, roofline))
        print(f"  measured tokenguard {mode:9s} prefill {pf:8.1f} tok/s  decode {dec:7.1f} tok/s  "
              f"({mib:.0f} MiB weights/token)", flush=True)
        if model.native_decode:  # the same model with every decode step through PyTorch's operators
            model.use_native_decode(False)
            pf, dec = time_runner(model, prompt_ids, args.new_tokens, args.runs)
            model.use_native_decode(True)
            rows.append((f"tokenguard {mode} (PyTorch path)", pf, dec, roofline))
            print(f"  measured tokenguard {mode:9s} prefill {pf:8.1f} tok/s  decode {dec:7.1f} tok/s  "
                  "without the native decode step", flush=True)
        models[mode] = model
    del weights
    if not args.skip_transformers:
        for name in args.transformers_dtypes.split(","):
            pf, dec = time_transformers(path, getattr(torch, name), device, prompt_ids, args.new_tokens, args.runs)
            rows.append((f"transformers {name}", pf, dec, None))
            print(f"  measured transformers {name:8s} prefill {pf:8.1f} tok/s  decode {dec:7.1f} tok/s", flush=True)
    # The public API and llama.cpp in alternating rounds (best of each kept): on a shared
    # machine either one's speed drifts by tens of percent over minutes.
    api = None if args.skip_public_api else PublicApi(path, device)
    api_best: tuple[float, float] | None = None
    cpp: tuple[float, float] | None = None
    # llama.cpp in a process of its own: a build whose kernels crash must not take the table with it.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for round_ in range(1, args.rounds + 1):
            line = f"  round {round_}:"
            if api is not None:
                # In this process, after the rows above ran parallel torch work on its main thread:
                # the runner's engine runs in a process of its own, so that work does not slow it
                # (benchmarks/bench_isolation.py measures how much it did when it did).
                api_round = api.measure(prompt_ids, args.new_tokens, args.runs)
                api_best = api_round if api_best is None else max(api_best, api_round, key=lambda r: r[1])
                line += f" LlamaRunner.generate decode {api_round[1]:6.1f} tok/s"
            if device.type == "cpu":
                try:
                    cpp_round = pool.submit(time_llama_cpp, path, prompt_ids, args.new_tokens, args.runs,
                                          frozenset(getattr(tokenizer, "eos_token_ids", ()))).result()
                except BrokenProcessPool:
                    print("  llama.cpp crashed: rebuild llama-cpp-python for this CPU (see `make bench`)")
                    break
                if cpp_round is None:
                    print("  no llama.cpp row (llama-cpp-python is installed by `make bench`)")
                    break
                cpp = cpp_round if cpp is None else max(cpp, cpp_round, key=lambda r: r[1])
                line += f"   llama.cpp decode {cpp_round[1]:6.1f} tok/s"
                if api is not None:
                    line += f"   ({api_round[1] / cpp_round[1]:.2f}x)"
            print(line, flush=True)
    if api is not None and api_best is not None:
        api.runner.close()
        rows.append((f"LlamaRunner.generate ({api.mode})", *api_best, None))
    if cpp is not None:
        rows.append(("llama.cpp (llama-cpp-python)", cpp[0], cpp[1], None))

    base = next((r for r in rows if r[0] == "transformers float32"), None)
    print()
    print(f"{'engine':32s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s} "
          f"{'roofline tok/s':>15s}")
    for name, pf, dec, roof in rows:
        px = f"{pf / base[1]:.2f}x" if base else "-"
        dx = f"{dec / base[2]:.2f}x" if base else "-"
        rf = f"{roof:.0f}" if roof else "-"
        print(f"{name:32s} {pf:14.1f} {dec:13.1f} {px:>10s} {dx:>9s} {rf:>15s}")
    if base:
        print("(x = ratio to transformers float32 generate on this machine; "
              "roofline = bandwidth / weight bytes per token)")
    if cpp is not None:
        print()
        for name, _, dec, _ in rows[:-1]:
            print(f"{name:32s} decode {dec / cpp[1]:.2f}x llama.cpp")

    if "float32" in models:
        print()
        print("accuracy against tokenguard float32 (teacher-forced on float32's greedy 32 tokens, "
              f"{len(ACCURACY_PROMPTS)} prompts)")
        reference = models["float32"]
        cases = []
        for text in ACCURACY_PROMPTS:
            ids = tokenizer.encode(text)
            cont = greedy_continuation(reference, ids, 32)
            cases.append((ids, cont, teacher_forced_logits(reference, ids, cont)))
        print(f"{'mode':10s} {'top-1 agree':>12s} {'max |dlogit|':>13s} {'mean |dlogit|':>14s}")
        for mode, model in models.items():
            agree, worst, means = 0, 0.0, []
            total = 0
            for ids, cont, ref in cases:
                got = teacher_forced_logits(model, ids, cont)
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += ref.shape[0]
                diff = (got - ref).abs()
                worst = max(worst, diff.max().item())
                means.append(diff.mean().item())
            print(f"{mode:10s} {agree / total:11.1%} {worst:13.4f} {statistics.mean(means):14.4f}")


if __name__ == "__main__":
    main()
