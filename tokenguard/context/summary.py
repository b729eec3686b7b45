"""``Summary``: older turns fold into one running summary; the newest stay as they are."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenguard.context.messages import fingerprint, is_instruction, message_line
from tokenguard.context.strategy import (
    Generate,
    Sessions,
    conversation_key,
    first_kept,
    pinned_indices,
    turn_indices_from_end,
    with_added,
)
from tokenguard.context.tail_only import TailOnly
from tokenguard.errors import ConfigError, InvalidRequest
from tokenguard.tokens import Tokenizer

__all__ = ["SUMMARY_HEADER", "Summary"]

#: How the summary message starts: the model reads it as what was said before the turns that follow.
SUMMARY_HEADER = "Summary of the earlier conversation:\n"
#: Tokens the summary message's framing may take beyond its text (role markers, header).
_FRAME = 32

INSTRUCTION = (
    "You keep a running summary of a conversation. Merge the new lines into the summary so far. "
    "Keep names, numbers, dates, codes and decisions exactly as written. "
    "Reply with the updated summary only, in a few short sentences."
)


@dataclass
class _Running:
    """One conversation's running summary and the last message folded into it (a mark
    of that message and the one before it, so a repeated message is not mistaken)."""

    text: str = ""
    last: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Summary:
    """Keep the newest turns as they are and fold the older ones into one running summary.

    The system messages and the newest user message are kept as by every strategy;
    then the newest turns up to ``keep_recent_tokens`` (fewer if the budget needs the
    room); everything older goes into one system message, :data:`SUMMARY_HEADER` and
    the summary, placed after the conversation's opening system messages. While the
    whole conversation fits, nothing is summarised and it is sent as it is.

    Incremental: each conversation (its ``session``, or without one its first message)
    keeps its summary and where it stopped; a fit folds in only the turns pushed out
    since, in chunks of at most ``chunk_tokens``, each a call ``summary so far + new
    lines -> new summary``, sized to fit the same budget. The summary never exceeds
    ``max_summary_tokens``, nor a quarter of the budget (the model is asked for that
    many at most, and a longer answer is cut). At most ``max_sessions`` summaries are
    kept, the least recently used dropped first; :meth:`end_session` drops one at once.

    ``summarizer`` is who summarises: ``None``, the guard's own backend, or another
    backend (an object with ``stream``, as :class:`~tokenguard.backends.Backend`);
    both are asked through the guard, so each summary is a call in the ledger tagged
    ``"summary"``, counted against the same budgets. A function ``fn(text) -> str``
    is called with the text to summarise (the summary so far and the new lines) and
    runs outside the guard: meter it by making its own model calls through a guard.
    """

    def __init__(
        self,
        summarizer: Callable[[str], str] | object | None = None,
        *,
        keep_recent_tokens: int = 512,
        max_summary_tokens: int = 256,
        chunk_tokens: int = 1024,
        max_sessions: int = 1000,
    ) -> None:
        if keep_recent_tokens < 0 or max_summary_tokens < 1 or chunk_tokens < 16:
            raise ConfigError("keep_recent_tokens must be >= 0, max_summary_tokens >= 1 and chunk_tokens >= 16")
        if summarizer is not None and not callable(summarizer) and not hasattr(summarizer, "stream"):
            raise ConfigError(
                f"summarizer must be None, a backend or a function fn(text) -> str, got {type(summarizer).__name__}"
            )
        self.summarizer = summarizer
        self.keep_recent_tokens = keep_recent_tokens
        self.max_summary_tokens = max_summary_tokens
        self.chunk_tokens = chunk_tokens
        self._tail = TailOnly()
        self._states: Sessions[_Running] = Sessions(max_sessions)

    def fit(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int,
        tokenizer: Tokenizer,
        *,
        session: str | None = None,
        generate: Generate | None = None,
    ) -> list[dict[str, Any]]:
        def chosen(indices: list[int]) -> list[dict[str, Any]]:
            return [dict(messages[i]) for i in indices]

        everything = self._tail.select(messages, max_tokens, tokenizer)  # raises InputTooLong
        if not self._older(messages, everything):
            return chosen(everything)
        pinned = pinned_indices(messages, turn_indices_from_end(messages))
        need = tokenizer.count_messages(chosen(sorted(pinned)))
        size = min(self.max_summary_tokens, max_tokens // 4)  # a summary never crowds out the conversation
        room = min(max_tokens - size - _FRAME, need + self.keep_recent_tokens)
        tail = self._tail.select(messages, max(room, need), tokenizer)
        fold = self._older(messages, tail)
        # Each summary request must fit the same budget: the instruction, the summary so
        # far at its largest, and a chunk of new lines (a few tokens spare for joins).
        framing = tokenizer.count_messages(self._prompt("", "")) + size + 8
        chunk = min(self.chunk_tokens, max_tokens - framing)
        if chunk < 16:
            return chosen(everything)  # no room to summarise in: the newest turns alone
        running = self._states.get(conversation_key(messages, session), _Running)
        with running.lock:
            self._fold(running, messages, fold, tail, tokenizer, generate, chunk, size)
            text = running.text
        left = size
        while text and left > 0:
            result = with_added(messages, tail, {"role": "system", "content": SUMMARY_HEADER + text})
            over = tokenizer.count_messages(result) - max_tokens
            if over <= 0:
                return result
            left = tokenizer.count(text) - over - 1  # a chat template's framing rarely costs this much
            text = tokenizer.truncate(text, max(left, 0))
        return chosen(everything)

    @staticmethod
    def _older(messages: Sequence[Mapping[str, Any]], kept: list[int]) -> list[int]:
        """The non-system messages older than the oldest kept non-system one."""
        return [i for i in range(first_kept(messages, kept)) if not is_instruction(messages[i])]

    def _fold(
        self,
        running: _Running,
        messages: Sequence[Mapping[str, Any]],
        fold: list[int],
        tail: list[int],
        tokenizer: Tokenizer,
        generate: Generate | None,
        chunk: int,
        size: int,
    ) -> None:
        """Bring ``running`` up to the end of ``fold``, summarising only what is new.

        A summary goes on from its mark: the digest of every message it has folded, in
        order. Only a conversation whose messages up to there are those very ones goes
        on from it; another that merely shares a message or two (two users' "Hello" and
        "Thanks") starts its own. The mark moves after each chunk, so a summary call
        that fails does not have the chunks before it folded again."""
        marks = _prefix_marks(messages)
        start = 0
        if running.last is not None:
            found = next((p for p in range(len(fold) - 1, -1, -1) if marks.get(fold[p]) == running.last), None)
            if found is not None:
                start = found + 1
            elif any(marks.get(i) == running.last for i in tail):
                return  # the budget grew: what was folded is sent as it is again
            else:
                running.text = ""  # not this conversation's summary (another one, or it was edited)
                running.last = None
        for lines, count in self._chunks([message_line(messages[i]) for i in fold[start:]], tokenizer, chunk):
            running.text = self._summarize(running.text, lines, tokenizer, generate, size)
            start += count
            running.last = marks[fold[start - 1]]

    @staticmethod
    def _chunks(lines: list[str], tokenizer: Tokenizer, chunk: int) -> Iterator[tuple[str, int]]:
        """``lines`` in groups of at most ``chunk`` tokens (a longer line is cut), each
        with how many lines it holds."""
        group: list[str] = []
        size = 0
        for line in lines:
            line = tokenizer.truncate(line, chunk - 1)
            cost = tokenizer.count(line) + 1
            if group and size + cost > chunk:
                yield "\n".join(group), len(group)
                group, size = [], 0
            group.append(line)
            size += cost
        if group:
            yield "\n".join(group), len(group)

    def _summarize(
        self, previous: str, lines: str, tokenizer: Tokenizer, generate: Generate | None, size: int
    ) -> str:
        text = self._prompt(previous, lines)[1]["content"]
        if callable(self.summarizer) and not hasattr(self.summarizer, "stream"):
            answer = self.summarizer(text)
        elif generate is None:
            raise ConfigError(
                "Summary asks a model for its summaries: use it in a Guard (Guard(context=Summary())), "
                "or pass summarizer=fn where fn(text) returns the summary"
            )
        else:
            answer = generate(self._prompt(previous, lines), size, self.summarizer, "summary")
        if not isinstance(answer, str):
            raise InvalidRequest(f"the summarizer must return a string, got {type(answer).__name__}")
        return tokenizer.truncate(answer.strip(), size)

    @staticmethod
    def _prompt(previous: str, lines: str) -> list[dict[str, Any]]:
        text = f"Summary so far:\n{previous or '(nothing yet)'}\n\nNew lines:\n{lines}"
        return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]

    def end_session(self, session: str) -> None:
        """Forget ``session``'s summary."""
        self._states.drop(conversation_key((), session))

    def __repr__(self) -> str:
        return (
            f"Summary(keep_recent_tokens={self.keep_recent_tokens}, max_summary_tokens={self.max_summary_tokens})"
        )


def _prefix_marks(messages: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """For each non-system message (by index), a digest of it and every non-system
    message before it: what a summary that folded up to there has read."""
    digest = hashlib.blake2b(digest_size=16)
    marks = {}
    for i, message in enumerate(messages):
        if not is_instruction(message):
            digest.update(fingerprint(message).encode("ascii"))
            marks[i] = digest.hexdigest()
    return marks
