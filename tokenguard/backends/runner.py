"""The default backend: tokenguard's bundled Llama runner, loaded on first use."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tokenguard.backends.base import BackendUsage, Chunk, Params, aiter_in_thread

if TYPE_CHECKING:
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["Runner"]


def _usage(result: Any) -> BackendUsage | None:
    """Usage from a runner result (``prompt_tokens``, ``token_ids``, ``cached_prompt_tokens``)."""
    if result is None:
        return None
    prompt = getattr(result, "prompt_tokens", None)
    ids = getattr(result, "token_ids", None)
    output = getattr(result, "completion_tokens", None)
    if output is None and ids is not None:
        output = len(ids)
    if prompt is None and output is None:
        return None
    return BackendUsage(prompt, output, getattr(result, "cached_prompt_tokens", None))


def _piece(item: Any) -> Chunk:
    if isinstance(item, str):
        return Chunk(text=item)
    return Chunk(text=getattr(item, "text", "") or "", finish_reason=getattr(item, "finish_reason", None))


class Runner:
    """Generate with :class:`tokenguard.runner.LlamaRunner` (PyTorch; CUDA when present).

    Pass a runner you built, or let this backend build one on first use with ``model``
    (default: the bundled SmolLM2-135M-Instruct), ``device`` and ``dtype``. Its tokenizer
    is the one the guard meters with, so counts match what the model saw.
    """

    name = "runner"

    def __init__(
        self,
        runner: Any = None,
        *,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from tokenguard.tokens import DEFAULT_MODEL_NAME

        self._runner = runner
        self._options = {"model": model, "device": device, "dtype": dtype}
        self.model = model or getattr(runner, "model_name", None) or DEFAULT_MODEL_NAME
        self._lock = threading.Lock()

    @property
    def runner(self) -> Any:
        """The :class:`~tokenguard.runner.LlamaRunner`, loaded on first use."""
        if self._runner is None:
            with self._lock:
                if self._runner is None:
                    from tokenguard.runner import LlamaRunner  # heavy: torch and the weights

                    self._runner = LlamaRunner(**self._options)
        return self._runner

    def tokenizer(self) -> Tokenizer | None:
        if self._runner is not None:
            return self._runner.tokenizer
        # Counting must not load the weights: the model file names the same tokenizer.
        from tokenguard.tokens import get_tokenizer

        return get_tokenizer(self._options["model"] or self.model)

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        pieces = self.runner.stream(messages=list(messages), **params)
        result = None
        try:
            while True:
                try:
                    item = next(pieces)
                except StopIteration as stop:
                    # LlamaRunner's TextStream keeps its result in .result; a plain
                    # generator may return it instead.
                    result = getattr(pieces, "result", None) or stop.value
                    break
                yield _piece(item)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        usage = _usage(result)
        finish_reason = getattr(result, "finish_reason", None)
        if usage is not None or finish_reason is not None:
            yield Chunk(finish_reason=finish_reason, usage=usage)

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        astream = getattr(self.runner, "astream", None)
        if astream is None:
            async for chunk in aiter_in_thread(lambda: self.stream(messages, params)):
                yield chunk
            return
        pieces = astream(messages=list(messages), **params)
        try:
            async for item in pieces:
                yield _piece(item)
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()

    def __repr__(self) -> str:
        return f"Runner(model={self.model!r})"
