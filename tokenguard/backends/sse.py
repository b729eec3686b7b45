"""Server-sent events: the ``data`` of each event in a body read as bytes, the same way
for the sync transport (httpx) and the async one (aiohttp)."""

from __future__ import annotations

import re

from tokenguard.errors import BackendError

__all__ = ["MOST_LINE_BYTES", "EventStream"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
#: The longest line of an event stream read (a server that never ends one is cut off).
MOST_LINE_BYTES = 8 << 20


class EventStream:
    """Feed a body's bytes as they arrive; get the data of each event they complete.

    Follows the EventSource rules we need: lines end at ``\\n``, ``\\r\\n`` or ``\\r``
    wherever the chunks fall (a ``\\r`` at a chunk's end waits for what follows), the
    ``data:`` lines of one event are joined with newlines, a blank line ends the event,
    ``:`` comments and other fields are ignored. Each byte is searched about once,
    however long its line. ``url`` names the server in the error for a line longer
    than :data:`MOST_LINE_BYTES`.
    """

    __slots__ = ("_data", "_pending", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self._pending = bytearray()  # the start of a line not ended yet
        self._data: list[str] = []  # the data lines of the event not ended yet

    def feed(self, part: bytes) -> list[str]:
        """The data of the events ``part`` ends (often none, often one)."""
        pending = self._pending
        held_cr = pending.endswith(b"\r")
        pending += part
        events: list[str] = []
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
        """The body ended: the data of the event it left open, if any."""
        events: list[str] = []
        if self._pending:
            self._line(self._pending.rstrip(b"\r"), events)
            self._pending = bytearray()
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
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
