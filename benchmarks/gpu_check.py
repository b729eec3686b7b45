"""One-command proof of the bundled runner's GPU path, on random-weight Llama checkpoints.

The script writes random-weight Hugging Face checkpoints of two real shapes (SmolLM2-135M
and Llama-3.2-1B; weights stored in bfloat16, so float32 loads are exact on both sides),
then checks ``LlamaRunner`` on the device against ``transformers`` on the same device:

1. ``exact fp32``: float32 greedy token ids identical to ``LlamaForCausalLM.generate``
   (4 prompts x 32 new tokens, one at a time and all four concurrently; CUDA graphs on).
2. ``bf16 close``: first next-token logits of our bfloat16 model are at least as close to
   transformers float32 as transformers bfloat16 is (within 1.5x); ``bf16 greedy``
   reports where bfloat16 greedy tokens first leave float32's (info).
3. ``decode b=1``: batch-1 decode tokens/s through the public API against
   ``transformers`` ``generate`` (target 3x on llama-1b); also with ``cuda_graphs=False``.
4. ``concurrency``: 32 and 128 concurrent requests on llama-1b against the same requests
   one at a time (target 5x at 32) and against transformers' static batch (info).
5. ``session reuse``: a chat session's second turn reuses the first turn's prompt KV and
   replies exactly as the same turn without a session.
6. ``cancel stress``: 64 streams cancelled at random points, plus session chats; once
   idle, every KV block is free again.
7. ``faiss gpu``: the index ``Retrieval`` builds (``context.vectors.flat_index``, a
   ``GpuIndexFlatIP`` there) against a CPU index, when a GPU FAISS build exists; and
   the semantic cache's GPU group (removal by skipping) against an exact CPU search of
   what is left after removing a tenth of it.

Run on a GPU machine from the repository root (about 2-3 minutes)::

    make gpu-check      # installs the packed wheels, then runs python3 benchmarks/gpu_check.py

``--dry-run`` runs the same code on CPU with a tiny shape and few tokens (well under a
minute; the speed targets are then reported, not enforced). ``--only decode,exact`` runs
a subset. The final markdown table is printed last and, with ``--json PATH`` (default
``$OUT/gpu_check.json`` when ``OUT`` is set), written as JSON. Exit status 0 when no row
FAILs. A check still running at ``--time-limit`` (450 s) fails, and the run stops there
with the table printed: a hang never costs the results.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tokenguard.runner import LlamaRunner
from tokenguard.runner.engine_process import EngineRecipe
from tokenguard.runner.generate import prefill
from tokenguard.runner.model import ContiguousKVCache, LlamaModel
from tokenguard.runner.result import GenerationResult
from tokenguard.tokens import get_tokenizer

# -- checkpoints -------------------------------------------------------------------------

_COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
           # No BOS/EOS anywhere: neither side ever stops early, every request runs to max_tokens.
           "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {**_COMMON, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
    "llama-1b": {**_COMMON, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                 "max_position_embeddings": 131072, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    # The dry run's shape: untied output head and llama3 scaling that matters at short range.
    "tiny": {**_COMMON, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
             "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}},
}
SPECIALS = ("<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LOGIT_STD = 2.0  # peaky enough that greedy comparisons mean something


def write_random_llama(folder: Path, hf_config: dict[str, Any], seed: int, device: str | torch.device = "cpu") -> None:
    """Write a random-weight Llama checkpoint folder that both LlamaRunner and transformers read.

    Weights are drawn on ``device`` (fast for large shapes) and stored in bfloat16, so a
    float32 load gives both sides bit-identical weights. Scales keep activations at unit
    size and make the final logits' std about ``LOGIT_STD``. The tokenizer covers every
    id below ``vocab_size`` and names no EOS, so generation never stops early.
    """
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = dict(_random_weights(hf_config, generator, torch.device(device)))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    _write_tokenizer(folder, hf_config["vocab_size"])
    tokenizer = get_tokenizer(str(folder))
    if tokenizer.vocab_size > hf_config["vocab_size"]:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {hf_config['vocab_size']}")


def _random_weights(cfg: dict[str, Any], generator: torch.Generator,
                    device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, bfloat16 CPU tensor)``: matrices ~ N(0, 1/in), norms ~ 1 + 0.1 N(0, 1)."""
    d, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    tied = cfg["tie_word_embeddings"]

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        values = torch.randn(shape, generator=generator, device=device) * std + mean
        return values.to(torch.bfloat16).cpu()

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return normal((rows, cols), 1 / math.sqrt(cols))

    # Logits are (unit-size normed hidden) . (output row): rows of std LOGIT_STD / sqrt(d).
    head_std = LOGIT_STD / math.sqrt(d)
    yield "model.embed_tokens.weight", normal((vocab, d), head_std if tied else 1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", matrix(q_rows, d)
        yield p + "self_attn.k_proj.weight", matrix(kv_rows, d)
        yield p + "self_attn.v_proj.weight", matrix(kv_rows, d)
        yield p + "self_attn.o_proj.weight", matrix(d, q_rows)
        yield p + "mlp.gate_proj.weight", matrix(f, d)
        yield p + "mlp.up_proj.weight", matrix(f, d)
        yield p + "mlp.down_proj.weight", matrix(d, f)
        yield p + "input_layernorm.weight", normal((d,), 0.1, mean=1.0)
        yield p + "post_attention_layernorm.weight", normal((d,), 0.1, mean=1.0)
    yield "model.norm.weight", normal((d,), 0.1, mean=1.0)
    if not tied:
        yield "lm_head.weight", normal((vocab, d), head_std)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode characters, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE (no merges) padded with filler tokens ``<fN>`` up to ``vocab_size``
    with the ChatML specials last; a ChatML template and no BOS/EOS."""
    fillers = [f"<f{i}>" for i in range(vocab_size - 256 - len(SPECIALS))]
    vocab = {token: i for i, token in enumerate([*_byte_alphabet(), *fillers])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": None, "eos_token": None, "add_bos_token": False}))


def make_prompts(vocab_size: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Random token-id prompts of the given lengths (no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size - len(SPECIALS)) for _ in range(n)] for n in lengths]


# -- report ------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Log ``what`` before and, with its duration, after."""
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what} ... {time.perf_counter() - start:.1f} s")


@dataclass(slots=True)
class Row:
    """One line of the final table; ``metrics`` holds the numbers for the JSON file."""

    check: str
    model: str
    target: str
    measured: str = ""
    status: str = "FAIL"  # PASS, FAIL, SKIP or INFO (measured, not enforced)
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def judge(self, ok: bool, enforced: bool = True) -> None:
        """PASS/FAIL, or INFO when the target is not enforced (saying how it would have gone)."""
        if enforced:
            self.status = "PASS" if ok else "FAIL"
        else:
            self.status = "INFO"
            self.note = "; ".join(filter(None, [self.note, f"not enforced ({'met' if ok else 'missed'})"]))


class Report:
    """The rows so far. Each check runs in :meth:`check`: an exception fails its row only."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.current: Row | None = None  # the check running now (for the time limit's message)

    @contextmanager
    def check(self, check: str, model: str, target: str) -> Iterator[Row]:
        row = Row(check, model, target)
        self.rows.append(row)
        outer, self.current = self.current, row
        log(f"{check} [{model}] ...")
        start = time.perf_counter()
        try:
            yield row
        except Exception as e:  # noqa: BLE001 - a failed check is a FAIL row; the others still run
            traceback.print_exc()
            row.status, row.note = "FAIL", f"{type(e).__name__}: {e}"[:300]
        finally:
            self.current = outer
        log(f"{check} [{model}]: {row.status} {row.measured} ({time.perf_counter() - start:.1f} s)")

    def add(self, row: Row) -> None:
        self.rows.append(row)
        log(f"{row.check} [{row.model}]: {row.status} {row.measured}")

    @property
    def failed(self) -> bool:
        return any(row.status == "FAIL" for row in self.rows)

    def markdown(self) -> str:
        lines = ["| check | model | measured | target | status | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            cells = [r.check, r.model, r.measured, r.target, r.status, r.note]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        return "\n".join(lines)


# -- settings and resources --------------------------------------------------------------

CHECKS = {"exact": "exact fp32", "bf16": "bf16 close", "decode": "decode b=1", "concurrency": "concurrency",
          "session": "session reuse", "cancel": "cancel stress", "faiss": "faiss gpu"}
EXACT_NEW_TOKENS = 32
STRESS_STREAMS = 64
STRESS_SESSIONS = 4
STRESS_MAX_TOKENS = 24
DECODE_SPEEDUP = 3.0
CONCURRENCY_SPEEDUP = 5.0
BF16_ERROR_RATIO = 1.5
FAISS_AGREEMENT = 0.99


@dataclass(frozen=True, slots=True)
class Settings:
    """What one run checks, and at which sizes (GPU run or CPU dry run)."""

    device: torch.device
    dry_run: bool
    models: tuple[str, ...]  # session and cancel checks run on the first
    concurrency_model: str
    decode_new_tokens: int  # N: decode rate = N / (t(N + 1) - t(1))
    concurrency: tuple[int, int]  # request counts; the first is held to CONCURRENCY_SPEEDUP
    concurrency_new_tokens: int
    kv_cache_bytes: int

    @classmethod
    def create(cls, device: torch.device, dry_run: bool) -> Settings:
        if dry_run:
            return cls(device, True, models=("tiny",), concurrency_model="tiny", decode_new_tokens=8,
                       concurrency=(8, 16), concurrency_new_tokens=16, kv_cache_bytes=64 << 20)
        return cls(device, False, models=("smollm2-135m", "llama-1b"), concurrency_model="llama-1b",
                   decode_new_tokens=128, concurrency=(32, 128), concurrency_new_tokens=64, kv_cache_bytes=4 << 30)

    def checks_for(self, model: str) -> set[str]:
        checks = {"exact", "bf16", "decode"}
        if model == self.models[0]:
            checks |= {"session", "cancel"}
        if model == self.concurrency_model:
            checks.add("concurrency")
        return checks


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelUnderTest:
    """One random checkpoint with its runners and transformers models, each opened on first
    use (so a failed load fails only the checks that need it) and closed by :meth:`release`."""

    def __init__(self, name: str, root: Path, settings: Settings, seed: int) -> None:
        self.name, self.settings, self.seed = name, settings, seed
        self.config = SHAPES[name]
        self.device = settings.device
        self._root = root
        self._folder: Path | None = None
        self._runners: dict[tuple[str, bool], LlamaRunner] = {}
        self._hf: dict[str, Any] = {}
        self._greedy: dict[str, list[list[int]]] = {}
        self.prompts = make_prompts(self.config["vocab_size"], (7, 19, 33, 60), seed)

    @property
    def folder(self) -> Path:
        if self._folder is None:
            with step(f"building {self.name} on {self.device}"):
                write_random_llama(self._root / self.name, self.config, self.seed, self.device)
            self._folder = self._root / self.name
        return self._folder

    def runner(self, dtype: str, cuda_graphs: bool = True) -> LlamaRunner:
        key = (dtype, cuda_graphs)
        if key not in self._runners:
            folder = self.folder
            with step(f"opening LlamaRunner {self.name} {dtype}{'' if cuda_graphs else ' without CUDA graphs'}"):
                self._runners[key] = LlamaRunner(folder, device=self.device, dtype=dtype,
                                                 kv_cache_bytes=self.settings.kv_cache_bytes,
                                                 cuda_graphs=cuda_graphs)
        return self._runners[key]

    def hf(self, dtype: str) -> Any:
        if dtype not in self._hf:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            folder = self.folder
            with step(f"loading transformers {self.name} {dtype}"):
                model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
                model.generation_config.eos_token_id = None
                model.generation_config.pad_token_id = 0
                self._hf[dtype] = model.to(self.device).eval()
        return self._hf[dtype]

    def greedy(self, dtype: str) -> list[list[int]]:
        """Our greedy continuations of :attr:`prompts`, one request at a time (memoized)."""
        if dtype not in self._greedy:
            runner = self.runner(dtype)
            self._greedy[dtype] = [runner.generate(p, max_tokens=EXACT_NEW_TOKENS).token_ids for p in self.prompts]
        return self._greedy[dtype]

    def release(self, runners: Sequence[tuple[str, bool]] = (), hf: Sequence[str] = ()) -> None:
        for key in runners:
            runner = self._runners.pop(key, None)
            if runner is not None:
                runner.close()
        for dtype in hf:
            self._hf.pop(dtype, None)
        free_memory(self.device)

    def close(self) -> None:
        self.release(list(self._runners), list(self._hf))


# -- measuring helpers ---------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """transformers greedy continuations of a left-padded batch, exactly ``new_tokens`` each."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    return out[:, width:].tolist()


@torch.inference_mode()
def hf_last_logits(model: Any, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float32 next-token logits ``[prompts, vocab]`` after each prompt."""
    rows = [model(torch.tensor([list(p)], device=model.device)).logits[0, -1].float() for p in prompts]
    return torch.stack(rows)


def ours_last_logits(model: LlamaModel, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """The same from our model, prefilled over a contiguous cache (no engine involved)."""
    config, device = model.config, model.inv_freq.device
    rows = []
    for p in prompts:
        cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, capacity=len(p),
                                  dtype=model.dtype, device=device)
        rows.append(prefill(model, torch.tensor(p, device=device), cache))
    return torch.stack(rows)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None."""
    index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if index is None and len(a) != len(b):
        return min(len(a), len(b))
    return index


def time_ours(runner: LlamaRunner, prompt: Sequence[int], new_tokens: int) -> float:
    """Seconds for one lone request."""
    start = time.perf_counter()
    result = runner.generate(prompt, max_tokens=new_tokens)
    elapsed = time.perf_counter() - start
    if len(result.token_ids) != new_tokens:
        raise AssertionError(f"asked for {new_tokens} tokens, got {len(result.token_ids)}")
    return elapsed


def time_hf(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> float:
    """Seconds for one ``generate`` call (its ``tolist`` waits for the device)."""
    start = time.perf_counter()
    hf_generate(model, prompts, new_tokens)
    return time.perf_counter() - start


def decode_rate(run: Callable[[int], float], n: int, repeats: int = 3) -> float:
    """Decode tokens/s of ``run(new_tokens) -> seconds``: N / (t(N + 1) - t(1)), prefill and
    first token cancelled out; the median of ``repeats`` after a warm-up."""
    run(n + 1)
    # (A dry run's few tokens on a noisy CPU could time t(N + 1) <= t(1): no division by zero.)
    return statistics.median(n / max(run(n + 1) - run(1), 1e-6) for _ in range(repeats))


def generate_concurrently(runner: LlamaRunner, prompts: Sequence[Sequence[int]],
                          new_tokens: int) -> tuple[float, list[GenerationResult]]:
    """Seconds for all ``prompts`` submitted at once from threads, and their results."""
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        start = time.perf_counter()
        results = list(pool.map(partial(runner.generate, max_tokens=new_tokens), prompts))
        return time.perf_counter() - start, results


def wait_idle(runner: LlamaRunner, timeout_s: float = 30.0) -> dict[str, int]:
    """The runner's stats once nothing runs or waits (raises after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = runner.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"runner still busy after {timeout_s} s: {stats}")
        time.sleep(0.05)


# -- checks ------------------------------------------------------------------------------


def check_exact(m: ModelUnderTest, row: Row) -> None:
    """float32 greedy ids equal transformers', one request at a time and all concurrently."""
    expected = [hf_generate(m.hf("float32"), [p], EXACT_NEW_TOKENS)[0] for p in m.prompts]
    _, results = generate_concurrently(m.runner("float32"), m.prompts, EXACT_NEW_TOKENS)
    runs = {"one at a time": m.greedy("float32"), "concurrent": [r.token_ids for r in results]}
    notes = []
    for label, got in runs.items():
        diverged = [(i, first_divergence(g, e)) for i, (g, e) in enumerate(zip(got, expected, strict=True))]
        notes += [f"{label}: prompt {i} differs at token {k}" for i, k in diverged if k is not None]
        row.metrics[label] = sum(k is None for _, k in diverged)
    n = len(m.prompts)
    row.measured = ", ".join(f"{label} {row.metrics[label]}/{n}" for label in runs) + " identical"
    row.note = "; ".join(notes[:3])
    row.judge(not notes)


def check_bf16(m: ModelUnderTest, row: Row) -> None:
    """Our bfloat16 logits are at most BF16_ERROR_RATIO x as far from float32 as transformers'."""
    reference = hf_last_logits(m.hf("float32"), m.prompts)
    theirs = relative_error(hf_last_logits(m.hf("bfloat16"), m.prompts), reference)
    # The runner's model lives in its engine process: the same recipe builds it here.
    model = EngineRecipe(m.folder, "bfloat16", str(m.device)).build_model()
    ours = relative_error(ours_last_logits(model, m.prompts), reference)
    row.metrics = {"ours_rel_error": ours, "hf_bf16_rel_error": theirs, "reference_logit_std": float(reference.std())}
    row.measured = f"rel. error ours {ours:.2e}, HF bf16 {theirs:.2e} ({ours / theirs:.2f}x)"
    row.note = f"reference logits std {reference.std():.2f}"
    row.judge(ours <= BF16_ERROR_RATIO * theirs)


def check_bf16_greedy(m: ModelUnderTest, row: Row) -> None:
    """Where the bfloat16 runner's greedy tokens first leave the float32 runner's (info)."""
    divergences = [first_divergence(a, b) for a, b in zip(m.greedy("bfloat16"), m.greedy("float32"), strict=True)]
    same = sum(k is None for k in divergences)
    row.metrics = {"identical": same, "first_divergence": divergences}
    row.measured = f"{same}/{len(divergences)} prompts identical over {EXACT_NEW_TOKENS} tokens"
    row.note = ", ".join(f"prompt {i}: first divergence at token {k}" for i, k in enumerate(divergences)
                         if k is not None)
    row.status = "INFO"


def check_decode(m: ModelUnderTest, report: Report, row: Row) -> None:
    """Batch-1 bfloat16 decode tokens/s, ours against transformers; then ours without graphs."""
    n, prompt = m.settings.decode_new_tokens, make_prompts(m.config["vocab_size"], (32,), m.seed + 1)[0]
    hf_model = m.hf("bfloat16")
    theirs = decode_rate(lambda k: time_hf(hf_model, [prompt], k), n)
    runner = m.runner("bfloat16")
    ours = decode_rate(lambda k: time_ours(runner, prompt, k), n)
    row.metrics = {"ours_tok_s": ours, "hf_tok_s": theirs, "ratio": ours / theirs}
    row.measured = f"ours {ours:.0f} tok/s, HF {theirs:.0f} tok/s ({ours / theirs:.1f}x)"
    enforced = not m.settings.dry_run and m.name == m.settings.concurrency_model
    row.judge(ours >= DECODE_SPEEDUP * theirs, enforced)
    if m.device.type != "cuda":
        return
    with report.check("decode b=1 eager", m.name, "info: cuda_graphs=False") as eager_row:
        eager_runner = m.runner("bfloat16", cuda_graphs=False)
        eager = decode_rate(lambda k: time_ours(eager_runner, prompt, k), n)
        eager_row.metrics = {"ours_eager_tok_s": eager}
        eager_row.measured = f"ours eager {eager:.0f} tok/s ({eager / theirs:.1f}x HF; graphs {ours / eager:.1f}x)"
        eager_row.status = "INFO"
    m.release(runners=[("bfloat16", False)])


def check_concurrency(m: ModelUnderTest, report: Report, row: Row) -> None:
    """Generated tokens/s of many concurrent requests: against one at a time, and against
    transformers' static batch of the same prompts."""
    s, runner, hf_model = m.settings, m.runner("bfloat16"), m.hf("bfloat16")
    rng = random.Random(m.seed + 2)
    n, counts = s.concurrency_new_tokens, s.concurrency
    prompts = make_prompts(m.config["vocab_size"], [rng.randint(20, 28) for _ in range(max(counts))], m.seed + 2)
    time_ours(runner, prompts[0], n)  # warm-up
    alone = counts[0] * n / sum(time_ours(runner, p, n) for p in prompts[: counts[0]])
    ours, theirs = {}, {}
    for count in counts:
        generate_concurrently(runner, prompts[:count], n)  # warm-up: graphs are captured per batch size
        elapsed, results = generate_concurrently(runner, prompts[:count], n)
        short = [len(r.token_ids) for r in results if len(r.token_ids) != n]
        if short:
            raise AssertionError(f"{len(short)} of {count} requests returned {short[:3]} tokens, not {n}")
        ours[count] = count * n / elapsed
        time_hf(hf_model, prompts[:count], n)  # warm-up
        theirs[count] = count * n / time_hf(hf_model, prompts[:count], n)
    first = counts[0]
    row.metrics = {"one_at_a_time_tok_s": alone, "concurrent_tok_s": ours, "hf_static_tok_s": theirs}
    row.measured = (f"{first}: {ours[first]:.0f} tok/s = {ours[first] / alone:.1f}x one at a time "
                    f"({alone:.0f} tok/s); " + ", ".join(f"{c}: {ours[c]:.0f} tok/s" for c in counts[1:]))
    row.judge(ours[first] >= CONCURRENCY_SPEEDUP * alone, enforced=not s.dry_run)
    ratios = {c: ours[c] / theirs[c] for c in counts}
    versus = Row("concurrency vs HF", m.name, "info: >= 1.0x HF static batch", status="INFO",
                 measured=", ".join(f"{c}: {ratios[c]:.2f}x ({theirs[c]:.0f} tok/s HF)" for c in counts),
                 note="met" if min(ratios.values()) >= 1.0 else "missed", metrics={"ratio": ratios})
    report.add(versus)


def check_session(m: ModelUnderTest, row: Row) -> None:
    """A session's second turn reuses the first turn's prompt and replies as without a session."""
    runner = m.runner("float32")
    turn1 = [{"role": "user", "content": "How does a paged KV cache share a prompt prefix?"}]
    before = runner.stats()["prefix_tokens_reused"]
    first = runner.chat(turn1, session="s", max_tokens=16)
    turn2 = [*turn1, {"role": "assistant", "content": first.text},
             {"role": "user", "content": "And what happens when blocks run out?"}]
    second = runner.chat(turn2, session="s", max_tokens=16)
    reused = runner.stats()["prefix_tokens_reused"] - before
    fresh = runner.chat(turn2, max_tokens=16)
    runner.end_session("s")
    same = second.token_ids == fresh.token_ids
    row.metrics = {"reused": reused, "turn1_prompt": first.prompt_tokens, "turn2_prompt": second.prompt_tokens,
                   "identical": same}
    row.measured = (f"reused {reused} of {second.prompt_tokens} prompt tokens (turn 1: {first.prompt_tokens}); "
                    f"reply {'identical' if same else 'differs'}")
    if not same:
        row.note = f"first divergence at token {first_divergence(second.token_ids, fresh.token_ids)}"
    row.judge(reused >= first.prompt_tokens and same and len(second.token_ids) == 16)


def _stream_and_cancel(runner: LlamaRunner, prompt: list[int], seed: int) -> None:
    """Read a random number of pieces (a quarter of the streams: all of them), then close."""
    rng = random.Random(seed)
    pieces = None if rng.random() < 0.25 else rng.randint(0, 20)
    with runner.stream(prompt, max_tokens=STRESS_MAX_TOKENS) as stream:
        for _ in itertools.islice(stream, pieces):
            pass


def _session_chat(runner: LlamaRunner, session: str, seed: int) -> None:
    """A session's full turn, a second turn cancelled part way, then end_session."""
    rng = random.Random(seed)
    turn1 = [{"role": "user", "content": f"Session {session}: say something."}]
    first = runner.chat(turn1, session=session, max_tokens=8)
    turn2 = [*turn1, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Go on."}]
    with runner.stream(messages=turn2, session=session, max_tokens=STRESS_MAX_TOKENS) as stream:
        for _ in itertools.islice(stream, rng.randint(0, 10)):
            pass
    runner.end_session(session)


def check_cancel(m: ModelUnderTest, row: Row) -> None:
    """Streams cancelled at random points and ended sessions leave every KV block free."""
    runner = m.runner("float32")
    start = wait_idle(runner)
    rng = random.Random(m.seed + 3)
    prompts = make_prompts(m.config["vocab_size"], [rng.randint(5, 40) for _ in range(STRESS_STREAMS)], m.seed + 3)
    jobs = [partial(_stream_and_cancel, runner, p, m.seed + i) for i, p in enumerate(prompts)]
    jobs += [partial(_session_chat, runner, f"stress-{i}", m.seed + i) for i in range(STRESS_SESSIONS)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    end = wait_idle(runner)
    row.metrics = {"free_before": start["kv_blocks_free"], "free_after": end["kv_blocks_free"],
                   "sessions_after": end["sessions"], "preemptions": end["preemptions"]}
    row.measured = (f"{len(jobs)} requests; free blocks {start['kv_blocks_free']} -> {end['kv_blocks_free']} "
                    f"of {end['kv_blocks_total']}, {end['sessions']} sessions left")
    row.judge(end["kv_blocks_free"] == start["kv_blocks_free"] and end["sessions"] == start["sessions"])


def _gpu_faiss(row: Row) -> Any:
    """The faiss module when it is a GPU build that sees a GPU; else ``None``, the row
    marked SKIP."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        row.status, row.note = "SKIP", "no GPU FAISS build installed"
        return None
    return faiss


def check_faiss(row: Row) -> None:
    """The flat index Retrieval builds (``context.vectors.flat_index``: on the GPU when
    FAISS sees one) agrees with a CPU index; SKIP without a GPU build."""
    faiss = _gpu_faiss(row)
    if faiss is None:
        return
    rng = np.random.default_rng(0)
    base = rng.standard_normal((100_000, 384), dtype=np.float32)
    queries = rng.standard_normal((1000, 384), dtype=np.float32)
    from tokenguard.context.vectors import flat_index

    gpu_index = flat_index(384)
    if "Gpu" not in type(gpu_index).__name__:
        row.status, row.note = "FAIL", f"flat_index built a {type(gpu_index).__name__}, not a GPU index"
        return
    gpu_index.add(base)
    gpu_index.search(queries[:10], 10)  # warm-up
    start = time.perf_counter()
    _, gpu_ids = gpu_index.search(queries, 10)
    qps = len(queries) / (time.perf_counter() - start)
    cpu_index = faiss.IndexFlatIP(384)
    cpu_index.add(base)
    _, cpu_ids = cpu_index.search(queries, 10)
    agreement = float((gpu_ids[:, 0] == cpu_ids[:, 0]).mean())
    row.metrics = {"top1_agreement": agreement, "queries_per_s": qps}
    row.measured = f"top-1 agreement {agreement:.3f}, {qps:,.0f} queries/s"
    row.judge(agreement >= FAISS_AGREEMENT)


def check_semantic_gpu(row: Row) -> None:
    """The semantic cache's group on the GPU (``cache.semantic._GpuGroup``) finds, after
    removals, what an exact CPU search of the remaining vectors finds; SKIP without a
    GPU build."""
    faiss = _gpu_faiss(row)
    if faiss is None:
        return
    from tokenguard.cache.semantic import _GpuGroup

    rng = np.random.default_rng(1)
    base = rng.standard_normal((100_000, 384), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = np.arange(1, len(base) + 1, dtype=np.int64)
    group = _GpuGroup(ids, base, 384, seen=len(base))
    removed = rng.choice(ids, size=len(ids) // 10, replace=False)
    group.remove(removed.tolist())
    kept = np.setdiff1d(ids, removed)
    cpu_index = faiss.IndexIDMap2(faiss.IndexFlatIP(384))
    cpu_index.add_with_ids(base[kept - 1], kept)
    queries = rng.standard_normal((300, 384), dtype=np.float32)
    start = time.perf_counter()
    found = [group.search(q, 4) for q in queries]
    per_query_ms = (time.perf_counter() - start) / len(queries) * 1e3
    _, expected = cpu_index.search(queries, 1)
    agreement = float(np.mean([bool(f) and f[0][1] == e for f, e in zip(found, expected[:, 0], strict=True)]))
    row.metrics = {"top1_agreement": agreement, "ms_per_query": per_query_ms}
    row.measured = f"top-1 agreement {agreement:.3f} after removing 10%, {per_query_ms:.2f} ms a lookup"
    row.judge(agreement >= FAISS_AGREEMENT and group.size == len(kept))


# -- driver ------------------------------------------------------------------------------


def check_model(m: ModelUnderTest, wanted: set[str], report: Report) -> None:
    """Run ``wanted`` checks on one checkpoint, releasing each runner once no later check needs it."""
    name, dry = m.name, m.settings.dry_run
    if "exact" in wanted:
        with report.check("exact fp32", name, "identical ids to HF fp32") as row:
            check_exact(m, row)
    if "session" in wanted:
        with report.check("session reuse", name, ">= turn-1 prompt reused; same reply") as row:
            check_session(m, row)
    if "cancel" in wanted:
        with report.check("cancel stress", name, "all KV blocks free again") as row:
            check_cancel(m, row)
    if "bf16" in wanted:
        with report.check("bf16 close", name, f"ours <= {BF16_ERROR_RATIO}x HF bf16 error") as row:
            check_bf16(m, row)
        with report.check("bf16 greedy", name, "info: vs fp32 runner") as row:
            check_bf16_greedy(m, row)
    m.release(runners=[("float32", True)], hf=["float32"])
    if "decode" in wanted:
        enforced = not dry and name == m.settings.concurrency_model
        target = f">= {DECODE_SPEEDUP:g}x HF" + ("" if enforced else " (info)")
        with report.check("decode b=1", name, target) as row:
            check_decode(m, report, row)
    if "concurrency" in wanted:
        first = m.settings.concurrency[0]
        target = f"{first} concurrent >= {CONCURRENCY_SPEEDUP:g}x one at a time" + (" (info)" if dry else "")
        with report.check("concurrency", name, target) as row:
            check_concurrency(m, report, row)


def run_checks(settings: Settings, only: set[str], report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for seed, name in enumerate(settings.models):
            wanted = only & settings.checks_for(name)
            if not wanted:
                continue
            model = ModelUnderTest(name, Path(tmp), settings, seed=1000 * (seed + 1))
            try:
                check_model(model, wanted, report)
            finally:
                model.close()
    if "faiss" in only:
        with report.check("faiss gpu", "100k x 384", f"top-1 agreement >= {FAISS_AGREEMENT}") as row:
            check_faiss(row)
        with report.check("semantic cache gpu", "100k x 384", f"top-1 agreement >= {FAISS_AGREEMENT}") as row:
            check_semantic_gpu(row)


def parse_only(value: str) -> set[str]:
    """``--only`` names: keys (``exact``) or row names (``exact fp32``), comma separated."""
    by_name = {v: k for k, v in CHECKS.items()}
    keys = {by_name.get(part.strip(), part.strip()) for part in value.split(",") if part.strip()}
    unknown = keys - CHECKS.keys()
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    return keys


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, few tokens; speed not enforced")
    parser.add_argument("--device", help="torch device (default: cuda; cpu with --dry-run)")
    parser.add_argument("--only", type=parse_only, default=set(CHECKS), help=f"subset of: {', '.join(CHECKS)}")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds; then print the rows so far, the running one failed, and exit 1 (0: none)")
    out = os.environ.get("OUT")
    parser.add_argument("--json", type=Path, default=Path(out) / "gpu_check.json" if out else None,
                        help="write the rows here (default: $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; --dry-run runs the CPU smoke version")
    return args


def environment(device: torch.device) -> dict[str, str]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.create(args.device, args.dry_run)
    log(f"{'dry run' if args.dry_run else 'GPU run'} on {args.device}: {', '.join(sorted(args.only))}")
    started = time.perf_counter()
    report = Report()
    # A hung check must not cost the table: the device machine shows only what was printed.
    watchdog = threading.Timer(args.time_limit, _time_out, (report, args, started))
    watchdog.daemon = True
    if args.time_limit > 0:
        watchdog.start()
    run_checks(settings, args.only, report)
    watchdog.cancel()
    return summarize(report, args, started)


def _time_out(report: Report, args: argparse.Namespace, started: float) -> None:
    """The time limit passed: fail the running check, print what there is, and exit."""
    if report.current is not None:
        report.current.status = "FAIL"
        report.current.note = f"still running at --time-limit {args.time_limit:g} s"
    log(f"time limit of {args.time_limit:g} s reached; later checks did not run")
    summarize(report, args, started)
    os._exit(1)  # the hung check's threads cannot be stopped


def summarize(report: Report, args: argparse.Namespace, started: float) -> int:
    """Print the environment and the table, write the JSON file; the exit status."""
    env = environment(args.device)
    wall = time.perf_counter() - started
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {**env, "dry_run": args.dry_run, "wall_s": wall, "rows": [asdict(r) for r in report.rows]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.json}")
    print(f"\ndevice: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
          f"python {env['python']}; {wall:.0f} s{' (dry run)' if args.dry_run else ''}\n", flush=True)
    print(report.markdown(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
