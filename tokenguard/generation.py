"""Step 6, generate: watch a backend's stream, count its output exactly and cut it at
``max_output_tokens`` when the backend does not stop by itself."""

from __future__ import annotations

from tokenguard.backends.base import BackendUsage, Chunk
from tokenguard.tokens import Tokenizer

__all__ = ["OutputCap"]


class OutputCap:
    """Feed it chunks; it returns the text to pass on and says when to stop.

    Counting every piece exactly would re-tokenize the whole reply per piece. Instead
    the exact count is refreshed only when the UTF-8 bytes received since the last
    count could reach the cap (a byte-level token covers at least one byte), so a reply
    is re-counted O(log n) times, each with ``count_until`` bounded by the cap.
    """

    __slots__ = (
        "tokenizer", "max_tokens", "_parts", "_emitted", "_counted", "_bytes_since",
        "cut", "finish_reason", "usage", "seen_output",
    )

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._parts: list[str] = []
        self._emitted = 0  # characters passed on
        self._counted = 0  # exact tokens of the text at the last count
        self._bytes_since = 0
        #: True once the guard itself ended the stream at the cap.
        self.cut = False
        self.finish_reason: str | None = None
        self.usage: BackendUsage | None = None
        #: True once the backend produced any output (text, a finish reason or usage).
        self.seen_output = False

    @property
    def text(self) -> str:
        """The text passed on so far."""
        return "".join(self._parts)

    def feed(self, chunk: Chunk) -> str:
        """The part of ``chunk`` to pass on ("" when nothing); sets :attr:`cut` when the
        reply reached the cap and the stream must be closed."""
        if chunk.usage is not None:
            self.usage = chunk.usage
            self.seen_output = True
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.seen_output = True
        piece = chunk.text
        if not piece or self.cut:
            return ""
        self.seen_output = True
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
        self.cut = True
        kept = self.tokenizer.truncate(text, self.max_tokens)
        emitted = text[: self._emitted]
        out = kept[self._emitted :] if kept.startswith(emitted) and len(kept) > self._emitted else ""
        self._parts = [emitted + out]
        self._emitted += len(out)
        return out

    def output_tokens(self) -> int:
        """Exact tokens of the text passed on."""
        return self.tokenizer.count(self.text)
