"""The default backend: tokenguard's bundled Llama runner, loaded on first use."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tokenguard.backends.base import Backend, BackendUsage, Chunk, Params
from tokenguard.errors import InvalidRequest

if TYPE_CHECKING:
    from tokenguard.runner import GenerationResult, LlamaRunner
    from tokenguard.runner.llama_runner import AsyncTextStream, TextStream
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["BundledRunner"]


class BundledRunner(Backend):
    """Generate with :class:`tokenguard.runner.LlamaRunner` (PyTorch; CUDA when present).

    Pass a runner you built, or let this backend build one on first use from
    ``model`` (default: the bundled SmolLM2-135M-Instruct), ``device``, ``dtype`` and
    any other :class:`~tokenguard.runner.LlamaRunner` option. Its tokenizer is the one
    the guard meters with, so counts match what the model saw.
    """

    name = "runner"
    #: The guard passes ``session=``: the runner keeps the session's KV between turns.
    accepts_session = True
    #: The runner decodes greedily unless a ``temperature`` is given.
    greedy_by_default = True

    def __init__(self, runner: LlamaRunner | None = None, *, model: str | None = None, device: str = "auto",
                 dtype: str = "auto", **runner_options: Any) -> None:
        from tokenguard.tokens import DEFAULT_MODEL_NAME

        self._runner = runner
        self._owns_runner = runner is None  # a runner passed in is its owner's to close
        self._options = {"model": model, "device": device, "dtype": dtype, **runner_options}
        # A runner passed in names its own model (its tokenizer's name: the bundled model's,
        # or its file's): the ledger and the prices must not take it for the default.
        self.model = model or (runner.tokenizer.name if runner is not None else DEFAULT_MODEL_NAME)
        self._lock = threading.Lock()

    @property
    def runner(self) -> LlamaRunner:
        """The :class:`~tokenguard.runner.LlamaRunner`, loaded on first use."""
        if self._runner is None:
            with self._lock:
                if self._runner is None:
                    from tokenguard.runner import LlamaRunner  # heavy: torch and the weights

                    self._runner = LlamaRunner(**self._options)
        return self._runner

    def cache_identity(self) -> object:
        """The model file and precision: an int4 model's answer is not a float32 one's."""
        if not self._owns_runner and self._runner is not None:
            return [self.name, str(self._runner.model_path), self._runner.precision.name]
        return [self.name, self.model, self._options["dtype"]]

    def warmup(self) -> None:
        """Load the runner now (model weights, engine, KV pool) unless it is loaded;
        after the first call this returns at once. Measured on CPU, a loaded runner's
        first generation is no slower than its second, so loading is all there is to do.
        """
        _ = self.runner  # the property loads on first access, under its lock

    def end_session(self, session: str) -> None:
        """Free the session's KV blocks now (nothing to do before the runner loads)."""
        if self._runner is not None:
            self._runner.end_session(session)

    def touch_session(self, session: str) -> None:
        """Keep the session's KV alive (nothing to do before the runner loads)."""
        if self._runner is not None:
            self._runner.touch(session)

    def context_window(self) -> int:
        """The model's context length (from its GGUF or config), loading it if needed."""
        return self.runner.context_length

    def close(self) -> None:
        """Stop the runner this backend built (its engine thread, its KV pool); a later
        call builds it again. A runner passed in is left to its owner."""
        with self._lock:
            runner, self._runner = self._runner, (None if self._owns_runner else self._runner)
        if runner is not None and self._owns_runner:
            runner.close()

    def tokenizer(self) -> Tokenizer:
        if self._runner is not None:
            return self._runner.tokenizer
        # Counting must not load the weights: the model file names the same tokenizer.
        from tokenguard.tokens import get_tokenizer

        return get_tokenizer(self._options["model"] or self.model)

    def check_params(self, params: Params) -> None:
        """The runner samples with these and nothing else (no tools, no response format)."""
        unknown = sorted(set(params) - _RUNNER_PARAMS)
        if unknown:
            raise InvalidRequest(
                f"the bundled runner does not take {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(sorted(_RUNNER_PARAMS))}"
            )

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        with self.runner.stream(messages=list(messages), **params) as pieces:
            for i, piece in enumerate(pieces):
                yield Chunk(text=piece, usage=None if i else _prompt_usage(pieces))
        yield _last_chunk(pieces.result)

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        async with self.runner.astream(messages=list(messages), **params) as pieces:
            first = True
            async for piece in pieces:
                yield Chunk(text=piece, usage=_prompt_usage(pieces) if first else None)
                first = False
        yield _last_chunk(pieces.result)

    def __repr__(self) -> str:
        return f"BundledRunner(model={self.model!r})"


_RUNNER_PARAMS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
                            "session"})


def _prompt_usage(pieces: TextStream | AsyncTextStream) -> BackendUsage | None:
    """The prompt's counts, sent with the first piece (its tokens and those the
    session's KV covered), so that a call closed before its end is metered with them;
    the last chunk's usage replaces it."""
    if pieces.prompt_tokens is None:
        return None
    return BackendUsage(pieces.prompt_tokens, None, pieces.cached_prompt_tokens)


def _last_chunk(result: GenerationResult | None) -> Chunk:
    """The runner's own counts: exactly the tokens the model read and wrote."""
    if result is None:  # the stream was closed before it finished
        return Chunk()
    usage = BackendUsage(result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens)
    return Chunk(finish_reason=result.finish_reason, usage=usage)
