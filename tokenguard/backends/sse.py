"""Server-sent events: the ``data`` of each event in a body read as bytes, the same way
for the sync transport (httpx) and the async one (aiohttp)."""

from __future__ import annotations

import re

from tokenguard.errors import BackendError

__all__ = ["MOST_LINE_BYTES", "EventStream"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
#: The longest line of an event stream read (a server that never ends one is cut off).
MOST_LINE_BYTES = 8 << 20


class EventStream:
    """Feed a body's bytes as they arrive; get the data of each event they complete.

    Follows the EventSource rules: a byte-order mark at the start is skipped; lines end
    at ``\\n``, ``\\r\\n`` or ``\\r`` wherever the chunks fall (a ``\\r`` at a chunk's end
    waits for what follows); the ``data:`` lines of one event are joined with newlines,
    a blank line ends the event, ``:`` comments and other fields are ignored; a body
    that ends inside a line drops that line's event (it was cut). Each byte is searched
    about once, however long its line. ``url`` names the server in the error for a
    line longer than :data:`MOST_LINE_BYTES`.
    """

    __slots__ = ("_data", "_pending", "_started", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self._pending = bytearray()  # the start of a line not ended yet
        self._data: list[str] = []  # the data lines of the event not ended yet
        self._started = False  # past the byte-order mark, if any

    def feed(self, part: bytes) -> list[str]:
        """The data of the events ``part`` ends (often none, often one)."""
        events: list[str] = []
        pending = self._pending
        if not pending and self._started and b"\r" not in part:  # the usual chunk: whole lines, LF
            *lines, rest = part.split(b"\n")
            for line in lines:
                self._line(line, events)
            pending += rest
        else:
            held_cr = pending.endswith(b"\r")
            pending += part
            if not self._started:
                if len(pending) < len(_BOM) and _BOM.startswith(bytes(pending)):
                    return events  # perhaps a mark split between chunks: wait for more
                self._started = True
                if pending.startswith(_BOM):
                    del pending[: len(_BOM)]
            if held_cr or b"\n" in part or b"\r" in part:
                end = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
                *lines, rest = _LINE_BREAK.split(pending[:end])
                self._pending = bytearray(rest) + pending[end:]
                for line in lines:
                    self._line(line, events)
        if len(self._pending) > MOST_LINE_BYTES:
            raise BackendError(f"{self.url} sent a line of over {MOST_LINE_BYTES} bytes in its event stream")
        return events

    def end(self) -> list[str]:
        """The body ended: the data of the event it left open, unless it ended inside a
        line (a lone ``\\r`` at the very end ends its line)."""
        events: list[str] = []
        if self._pending.endswith(b"\r"):
            self._line(self._pending[:-1], events)
        elif self._pending:  # cut inside a line: its event is not whole
            self._data = []
        self._pending = bytearray()
        self._line(b"", events)  # as a blank line would: the event left open ends
        return events

    def _line(self, raw: bytes | bytearray, events: list[str]) -> None:
        if not raw:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        line = raw.decode("utf-8", "replace")
        field, _, value = line.partition(":")
        if field == "data":  # a comment (":...") has no field name: ignored with the rest
            self._data.append(value[1:] if value.startswith(" ") else value)
