"""Turn a sequence's token ids into reply text pieces: incremental detokenization,
stop tokens and stop strings, and the final :class:`GenerationResult`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from tokenguard.runner.detokenizer import Decoder, IncrementalDetokenizer, StopStrings

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class GenerationResult:
    """One finished generation.

    ``token_ids`` are the generated ids only (an ending EOS/end-of-turn token included;
    its text is not part of ``text``). ``finish_reason`` is ``"stop"`` (a stop token or
    stop string) or ``"length"`` (``max_tokens`` or the context window reached).
    ``cached_prompt_tokens`` is how much of the prompt a session's kept KV covered.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class ReplyText:
    """Accumulates one reply's tokens; hands out text once it is final (never half a
    character, never text a stop string may still claim)."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stop: Sequence[str],
                 stop_token_ids: Collection[int]) -> None:
        self.prompt_tokens = len(prompt_ids)
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopStrings(stop)
        self._stop_token_ids = stop_token_ids
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason = "length"
        self.stopped = False  # a stop token or stop string ended the reply
        self._emitted = 0

    def push(self, token: int) -> str:
        """Add a generated token; the text it made final (possibly "")."""
        self.token_ids.append(token)
        if token in self._stop_token_ids:
            self.finish_reason, self.stopped = "stop", True
            return ""
        self._extend(self._detok.push(token))
        return self._release(self._stops.safe_length(self.text))

    def finish(self) -> str:
        """The reply ended: the text still held back."""
        if not self.stopped:
            self._extend(self._detok.flush())
        return self._release(len(self.text))

    def result(self, cached_prompt_tokens: int = 0) -> GenerationResult:
        return GenerationResult(self.text, self.token_ids, self.finish_reason, self.prompt_tokens,
                                cached_prompt_tokens)

    def _extend(self, piece: str) -> None:
        searched, self.text = len(self.text), self.text + piece
        cut = self._stops.find(self.text, searched)
        if cut >= 0:
            self.text, self.finish_reason, self.stopped = self.text[:cut], "stop", True

    def _release(self, upto: int) -> str:
        upto = min(upto, len(self.text))
        if upto <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted : upto], upto
        return piece
