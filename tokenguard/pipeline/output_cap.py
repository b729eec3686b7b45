"""The first chunk watcher: cut a reply at ``max_output_tokens``, exactly, when the
backend does not stop by itself."""

from __future__ import annotations

from tokenguard.pipeline.call import Call
from tokenguard.pipeline.steps import Stop
from tokenguard.tokens import Tokenizer

__all__ = ["CapWatch", "OutputCap"]


class CapWatch:
    """One call's count of its output against ``max_tokens``.

    Counting every piece exactly would re-tokenize the whole reply per piece. Instead
    the exact count is refreshed only when the UTF-8 bytes received since the last
    count could reach the cap (a byte-level token covers at least one byte), so a reply
    is re-counted O(log n) times, each with ``count_until`` bounded by the cap.
    """

    __slots__ = ("_bytes_since", "_counted", "_emitted", "_parts", "max_tokens", "tokenizer")

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._parts: list[str] = []
        self._emitted = 0  # characters passed on
        self._counted = 0  # exact tokens of the text at the last count
        self._bytes_since = 0

    def feed(self, piece: str) -> str | Stop:
        self._parts.append(piece)
        self._bytes_since += len(piece.encode("utf-8", "surrogatepass"))
        if self._counted + self._bytes_since < self.max_tokens:
            self._emitted += len(piece)
            return piece
        text = "".join(self._parts)
        self._parts = [text]
        self._counted = self.tokenizer.count_until(text, self.max_tokens)
        self._bytes_since = 0
        if self._counted <= self.max_tokens:
            self._emitted += len(piece)
            return piece
        # Over the cap: keep the longest prefix that fits, of which some is already out.
        kept = self.tokenizer.truncate(text, self.max_tokens)
        emitted = text[: self._emitted]
        out = kept[self._emitted :] if kept.startswith(emitted) and len(kept) > self._emitted else ""
        self._parts = [emitted + out]
        self._emitted += len(out)
        return Stop("length", keep=out, saves=False)


class OutputCap:
    """Ends a stream once its text would pass the call's ``max_output_tokens``, keeping
    the longest prefix that fits (stop reason ``"length"``)."""

    def watch(self, call: Call) -> CapWatch:
        return CapWatch(call.tokenizer, call.max_output_tokens)

    def __repr__(self) -> str:
        return "OutputCap()"
