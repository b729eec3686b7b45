"""Loading a model: what it logs, the size it reports, and the backend's warm-up."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading

import pytest

from tokenguard.backends import BundledRunner
from tokenguard.runner import LlamaRunner
from tokenguard.runner.model import load_checkpoint
from tokenguard.tokens import DEFAULT_MODEL_NAME, get_tokenizer

SMALL_KV = 1 << 20  # the tiny model needs a few blocks, not the default 1 GiB pool


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("tokenguard.")]


@pytest.mark.parametrize(("which", "dtype", "fmt"), [("folder", "float32", "safetensors"),
                                                     ("gguf_q_path", "int4", "gguf")])
def test_loading_logs_the_model_then_how_long_it_took(tiny_llama, caplog, capsys, which, dtype, fmt):
    path = getattr(tiny_llama, which)
    caplog.set_level(logging.DEBUG, logger="tokenguard")
    LlamaRunner(path, device="cpu", dtype=dtype, kv_cache_bytes=SMALL_KV).close()
    info = _messages(caplog, logging.INFO)
    assert info[0] == f"loading model {path} ({fmt}, {dtype} on cpu)"
    assert re.fullmatch(rf"loaded {re.escape(path.name)} in \d+\.\d s \(107\.1 k parameters, [\d.]+ [kM]B on disk\)",
                        info[1])
    assert len(info) == 2
    debug = "\n".join(_messages(caplog, logging.DEBUG))
    for stage in (f"read {path.name}: ", f"converted layer 2/2 to {dtype}", "built the model", "KV cache: ",
                  f"tokenizer of {path.name} ready"):
        assert stage in debug
    assert not _messages(caplog, logging.WARNING)
    assert capsys.readouterr() == ("", "")  # a library logs; it never prints


@pytest.mark.parametrize("which", ["folder", "gguf_path", "gguf_q_path"])
def test_parameter_count_is_what_the_checkpoint_holds(tiny_llama, which):
    config, weights = load_checkpoint(getattr(tiny_llama, which))
    assert config.num_parameters == sum(math.prod(w.shape) for w in weights.values()) == 107_072


def test_tied_embeddings_are_counted_once(tiny_llama):
    config, _ = load_checkpoint(tiny_llama.folder)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    assert config.num_parameters - tied.num_parameters == config.vocab_size * config.hidden_size


def test_warmup_loads_the_runner_once_whatever_the_threads(tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="tokenguard")
    backend = BundledRunner(model=str(tiny_llama.gguf_path), device="cpu", dtype="float32", kv_cache_bytes=SMALL_KV)
    assert backend._runner is None  # nothing loads before it is asked to
    threads = [threading.Thread(target=backend.warmup) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner = backend.runner
    try:
        backend.warmup()
        assert backend.runner is runner
        assert sum(m.startswith("loading model ") for m in _messages(caplog, logging.INFO)) == 1
        assert backend.tokenizer() is runner.tokenizer
        assert runner.generate("hi", max_tokens=2).completion_tokens >= 1
    finally:
        backend.close()  # the runner it built is its own to stop
    assert backend._runner is None and runner.engine.exitcode is not None


def test_warmup_of_a_given_runner_keeps_it(tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="tokenguard")
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", kv_cache_bytes=SMALL_KV)
    try:
        caplog.clear()
        backend = BundledRunner(runner)
        backend.warmup()
        assert backend.runner is runner and not _messages(caplog, logging.INFO)
    finally:
        runner.close()


@pytest.mark.slow
def test_the_default_model_shares_the_tokenizer_the_guard_counts_with(bundled_runner):
    # Counting loaded it by name before the weights; the runner does not read it a second time.
    assert bundled_runner.tokenizer is get_tokenizer(DEFAULT_MODEL_NAME)
