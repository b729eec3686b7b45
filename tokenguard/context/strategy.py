"""What a context strategy is, and the rules every one keeps."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from tokenguard.context.messages import fingerprint, is_instruction, turn_key
from tokenguard.errors import ConfigError, InvalidRequest
from tokenguard.tokens import Tokenizer

__all__ = [
    "ContextStrategy",
    "ConversationStrategy",
    "CountMemo",
    "Generate",
    "Sessions",
    "Turn",
    "TurnCosts",
    "conversation_key",
    "first_kept",
    "pinned_indices",
    "turn_cost",
    "turn_indices_from_end",
    "turns",
    "with_added",
]

S = TypeVar("S")

_CACHE_SIZE = 65_536  # per-turn counts remembered, least recently used dropped first
_EMPTY_SYSTEM = {"role": "system", "content": ""}

Turn = list[dict[str, Any]]
"""Messages that stay or go together: one message, or an assistant message that calls
tools with the tool results that answer it."""


@runtime_checkable
class ContextStrategy(Protocol):
    """Builds the messages to send from a conversation, within ``max_tokens``.

    Every strategy guarantees: the result's exact count (chat template included, with
    ``tokenizer``) is at most ``max_tokens``; system messages are kept; the newest user
    message is kept whole, or :class:`~tokenguard.InputTooLong` is raised; an assistant
    message with tool calls and its tool results stay or go together; order is kept;
    ``messages`` is not changed.
    """

    def fit(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        ...


Generate = Callable[[list[dict[str, Any]], int, Any, str], str]
"""A model call a strategy needs (a summary): the messages to send, the reply's token
cap, the backend to ask (``None``: the guard's own) and a tag for the ledger; the
reply's text comes back. The guard makes it a metered call of its own."""


@runtime_checkable
class ConversationStrategy(ContextStrategy, Protocol):
    """A strategy that remembers each conversation between fits (a running summary, an
    index of turns). The guard passes the call's ``session`` (``None``: the conversation
    is told by its first message) and a :data:`Generate` for the model calls the
    strategy makes, and calls :meth:`end_session` when a session ends or expires, so
    that what the strategy keeps for it is freed."""

    def fit(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int,
        tokenizer: Tokenizer,
        *,
        session: str | None = None,
        generate: Generate | None = None,
    ) -> list[dict[str, Any]]:
        ...

    def end_session(self, session: str) -> None:
        ...


def first_kept(messages: Sequence[Mapping[str, Any]], kept: Sequence[int]) -> int:
    """The index of the oldest non-system message in ``kept`` (``len(messages)`` when
    there is none): everything before it, system messages aside, was left out."""
    return next((i for i in kept if not is_instruction(messages[i])), len(messages))


def with_added(
    messages: Sequence[Mapping[str, Any]], kept: Sequence[int], added: dict[str, Any]
) -> list[dict[str, Any]]:
    """The ``kept`` messages (indices, in order) with a strategy's own ``added`` message
    (a summary, recalled turns) placed after the system messages that open them."""
    at = next((k for k, i in enumerate(kept) if not is_instruction(messages[i])), len(kept))
    return [*(dict(messages[i]) for i in kept[:at]), added, *(dict(messages[i]) for i in kept[at:])]


def conversation_key(messages: Sequence[Mapping[str, Any]], session: str | None) -> str:
    """What a strategy files a conversation's state under: its session, or without one
    the fingerprint of its first non-system message (a conversation resent whole, turn
    after turn, keeps its first message)."""
    if session is not None:
        return f"session:{session}"
    first = next((m for m in messages if not is_instruction(m)), {})
    return f"conversation:{fingerprint(first)}"


class Sessions(Generic[S]):
    """Per-conversation state of a strategy, at most ``max_sessions`` of them, the least
    recently used dropped first (a session's own state is bounded by the strategy)."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ConfigError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self._states: OrderedDict[str, S] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, new: Callable[[], S]) -> S:
        """The state filed under ``key``, made by ``new()`` the first time."""
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = new()
                while len(self._states) > self.max_sessions:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(key)
            return state

    def drop(self, key: str) -> None:
        """Forget the state filed under ``key``."""
        with self._lock:
            self._states.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)


def turn_indices_from_end(messages: Sequence[Mapping[str, Any]]) -> Iterator[list[int]]:
    """The turns of ``messages`` as lists of indices, newest first, read lazily from
    the end (a strategy that keeps the newest turns reads no further than it keeps).

    Tool results join the assistant message right before them that called tools; a
    tool result with no such call (its call was dropped from the history) belongs to
    no turn, so it is never sent alone.
    """
    results: list[int] = []
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.get("role") == "tool":
            results.append(i)
            continue
        if results and message.get("tool_calls"):
            yield [i, *reversed(results)]
        else:
            yield [i]
        results = []


def turns(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """``messages`` cut into turns, in order (see :func:`turn_indices_from_end`)."""
    return [[dict(messages[i]) for i in turn] for turn in reversed(list(turn_indices_from_end(messages)))]


def pinned_indices(messages: Sequence[Mapping[str, Any]], newest_first: Iterator[list[int]]) -> list[int]:
    """What every strategy keeps whatever the budget: the system messages, and the
    newest user message with whatever follows it (tool calls and their results, an
    assistant's answer). ``newest_first`` is :func:`turn_indices_from_end` of
    ``messages``; it is read up to that user message, so a strategy goes on from there
    to the older turns. Raises :class:`~tokenguard.InvalidRequest` unless ``messages`` is
    a non-empty list of message dicts, each with a string role: every strategy starts
    here, so none reads a malformed history."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest(f"a strategy fits a non-empty list of message dicts, got {type(messages).__name__}")
    kept = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"message {i} must be a dict with a string 'role', got {message!r:.80}")
        if is_instruction(message):
            kept.append(i)
    for turn in newest_first:
        if not is_instruction(messages[turn[0]]):
            kept += turn
            if messages[turn[0]].get("role") == "user":
                break
    return kept


def no_user_note(messages: Sequence[Mapping[str, Any]]) -> str:
    """For an error about what :func:`pinned_indices` keeps: a history with no user
    message keeps every message, which the error should say."""
    return "" if any(m.get("role") == "user" for m in messages) else " (there is none: every message is kept)"


def turn_cost(tokenizer: Tokenizer, turn: Sequence[Mapping[str, Any]]) -> int:
    """The tokens ``turn`` adds to a prompt, its framing included. Counted beside an
    empty system message: a chat template that puts in a default system prompt when
    there is none (as SmolLM2's does) would otherwise charge it to every turn."""
    return max(tokenizer.count_messages([_EMPTY_SYSTEM, *turn]) - tokenizer.count_messages([_EMPTY_SYSTEM]), 0)


class CountMemo:
    """Token counts remembered by key: at most ``size`` of them, the least recently used
    dropped first; safe to share between threads (counting runs outside its lock)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._counts: OrderedDict[Hashable, int] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, keys: Sequence[Hashable]) -> list[int | None]:
        """The count remembered for each key (None where there is none); the found ones
        become the most recently used."""
        with self._lock:
            counts = [self._counts.get(key) for key in keys]
            for key, count in zip(keys, counts, strict=True):
                if count is not None:
                    self._counts.move_to_end(key)
        return counts

    def remember(self, counts: Mapping[Hashable, int]) -> None:
        """Keep ``counts``, dropping the least recently used beyond ``size``."""
        with self._lock:
            self._counts.update(counts)
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)

    def __len__(self) -> int:
        """How many counts are remembered."""
        with self._lock:
            return len(self._counts)


class TurnCosts(CountMemo):
    """What a turn adds to a prompt (its framing included), remembered by content.

    A strategy asks for the same turns call after call (a chat resends its history; a
    nested call forwards its parent's), so each turn is counted once per tokenizer. At
    most ``size`` counts are kept, the least recently used dropped first.
    """

    def __call__(self, tokenizer: Tokenizer, turn: Turn) -> int:
        """The tokens ``turn`` adds to a prompt (see :func:`turn_cost`)."""
        key = f"{tokenizer.name}:{turn_key(turn)}"
        (cost,) = self.lookup([key])
        if cost is None:
            cost = turn_cost(tokenizer, turn)
            self.remember({key: cost})
        return cost
