"""``Retrieval``: the recent turns, and the older turns (and document chunks) that the
newest question recalls, found by meaning and by words together."""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenguard.context.embedder import as_embedder, require_vector_packages
from tokenguard.context.messages import content_text, is_instruction, message_line, terms, turn_key
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
from tokenguard.context.vectors import flat_index
from tokenguard.errors import ConfigError
from tokenguard.tokens import Tokenizer

__all__ = ["DOCUMENTS_HEADER", "RECALLED_HEADER", "Retrieval", "terms"]

#: How the recalled message starts, and where its document chunks begin.
RECALLED_HEADER = "Recalled from earlier in this conversation (older than the turns that follow):\n"
DOCUMENTS_HEADER = "From the documents:\n"
#: How much a turn's words count beside its meaning (its BM25 score relative to the
#: best turn's, added to its cosine): chosen on benchmarks/bench_context.py's
#: planted-fact conversations, where more drowns the meaning in common words.
LEXICAL_WEIGHT = 0.2
#: What a turn of the speaker the question points at gains.
SPEAKER_CUE = 0.05
_FIRST_PERSON = frozenset({"my", "me", "mine", "our", "ours", "we", "us", "我", "我的", "我们"})
_SECOND_PERSON = frozenset({"you", "your", "yours", "你", "你的", "您"})
_BM25_K1, _BM25_B = 1.2, 0.75



def _speaker(words: Iterable[str]) -> str | None:
    """Whose turn a question points at: the user's ("my passport"), the assistant's
    ("what did you suggest"), or, with both or neither, nobody's."""
    said = set(words)
    first, second = bool(said & _FIRST_PERSON), bool(said & _SECOND_PERSON)
    if first == second:
        return None
    return "user:" if first else "assistant:"


@dataclass
class _Item:
    """One indexed turn or document chunk: the text it is recalled as, its words, its
    row in the index and its token counts per tokenizer."""

    text: str
    words: Counter[str]
    row: int
    tokens: dict[str, int] = field(default_factory=dict)

    def cost(self, tokenizer: Tokenizer) -> int:
        count = self.tokens.get(tokenizer.name)
        if count is None:
            count = self.tokens[tokenizer.name] = tokenizer.count(self.text) + 1  # and its line break
        return count


class _Memory:
    """The indexed turns of one conversation (or the chunks of the documents): their
    vectors in a flat FAISS index, their words in an inverted index for BM25. At most
    ``max_items``: past that the oldest go and the index is rebuilt from the rest."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.items: dict[str, _Item] = {}  # insertion order = age
        self.postings: dict[str, set[str]] = {}
        self.total_words = 0
        self.lock = threading.Lock()
        self._index: Any = None
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._keys: list[str] = []  # row -> key

    def add(self, new: list[tuple[str, str]], embed: Any) -> None:
        """Index the ``(key, text)`` pairs not indexed yet, embedding them in one batch."""
        new = [(key, text) for key, text in dict(new).items() if key not in self.items]
        if not new:
            return
        vectors = embed([text for _, text in new])
        if self._index is None:
            self._index = flat_index(vectors.shape[1])
            self._vectors = np.zeros((0, vectors.shape[1]), dtype=np.float32)
        self._index.add(vectors)
        self._vectors = np.concatenate([self._vectors, vectors])
        for (key, text), _ in zip(new, vectors, strict=True):
            words = Counter(terms(text))
            self.items[key] = _Item(text, words, len(self._keys))
            self._keys.append(key)
            self.total_words += sum(words.values())
            for word in words:
                self.postings.setdefault(word, set()).add(key)
        if len(self.items) > self.max_items:
            self._evict(len(self.items) - self.max_items)

    def _evict(self, count: int) -> None:
        for key in list(self.items)[:count]:
            item = self.items.pop(key)
            self.total_words -= sum(item.words.values())
            for word in item.words:
                keys = self.postings[word]
                keys.discard(key)
                if not keys:
                    del self.postings[word]
        rows = [item.row for item in self.items.values()]
        self._vectors = self._vectors[rows]
        self._keys = list(self.items)
        for row, item in enumerate(self.items.values()):
            item.row = row
        self._index.reset()
        self._index.add(self._vectors)

    def dense(self, query: np.ndarray, allowed: set[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` allowed keys nearest to ``query`` with their cosine, nearest first."""
        if self._index is None or not allowed:
            return []
        # Searching past the keys that are not allowed finds the best k of those that are.
        reach = min(len(self._keys), k + len(self._keys) - len(allowed & self.items.keys()))
        scores, rows = self._index.search(query[None, :], reach)
        found = zip(scores[0].tolist(), rows[0].tolist(), strict=True)
        return [(self._keys[r], s) for s, r in found if r >= 0 and self._keys[r] in allowed][:k]

    def cosine(self, query: np.ndarray, keys: Iterable[str]) -> dict[str, float]:
        """The cosine of ``query`` with each of ``keys``' vectors."""
        keys = list(keys)
        if not keys:
            return {}
        scores = self._vectors[[self.items[key].row for key in keys]] @ query
        return dict(zip(keys, scores.tolist(), strict=True))

    def lexical(self, query: Iterable[str], allowed: set[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` allowed keys with the best BM25 score for ``query``'s words, best first."""
        if not self.items:
            return []
        average = self.total_words / len(self.items)
        scores: dict[str, float] = {}
        for word in set(query):
            keys = self.postings.get(word, set()) & allowed
            if not keys:
                continue
            idf = math.log(1 + (len(self.items) - len(self.postings[word]) + 0.5) / (len(self.postings[word]) + 0.5))
            for key in keys:
                item = self.items[key]
                tf = item.words[word]
                norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * sum(item.words.values()) / average)
                scores[key] = scores.get(key, 0.0) + idf * tf * (_BM25_K1 + 1) / (tf + norm)
        return sorted(scores.items(), key=lambda hit: -hit[1])[:k]


def _recalled_text(packed: list[tuple[int | None, _Item]]) -> str:
    """The recalled message: the turns in their order, then the document chunks in theirs."""
    turns = [item.text for _, item in sorted((p, item) for p, item in packed if p is not None)]
    chunks = sorted((item for p, item in packed if p is None), key=lambda item: item.row)
    text = RECALLED_HEADER + "\n".join(turns) if turns else ""
    if chunks:
        text += ("\n\n" if text else "") + DOCUMENTS_HEADER + "\n".join(item.text for item in chunks)
    return text


def _turn_text(messages: Sequence[Mapping[str, Any]], turn: list[int]) -> str:
    return "\n".join(message_line(messages[i]) for i in turn)


class Retrieval:
    """The recent turns, and the older turns and document chunks the question recalls.

    Kept as by every strategy: the system messages and the newest user message; then
    the newest turns up to ``keep_recent_tokens``. The room left goes to recall: every
    older turn is embedded once (``embedder=None``: the bundled all-MiniLM-L6-v2) into
    the conversation's own FAISS index (on the GPU when FAISS sees one) and its words
    into a BM25 index; the newest user message ranks the older turns and the chunks of
    ``documents`` (cut at ``chunk_tokens``) by meaning and by words, the two rankings
    fused by reciprocal rank. The ``k`` best each bring their ``neighbours`` turns on
    either side (a question brings its answer, an answer its question) and are packed
    while they fit, then sent in their original order as one system message,
    :data:`RECALLED_HEADER` and the turns (the documents' chunks under
    :data:`DOCUMENTS_HEADER`), placed before the recent turns. While the whole
    conversation fits, it is sent as it is, with the chunks of ``documents`` that fit
    the room it leaves.

    Bounds: at most ``max_turns`` indexed turns per conversation (the oldest go
    first), at most ``max_sessions`` conversations (the least recently used go
    first); :meth:`end_session` frees one's index at once.
    """

    def __init__(
        self,
        embedder: object = None,
        *,
        k: int = 32,
        documents: Sequence[str] | None = None,
        keep_recent_tokens: int = 256,
        neighbours: int = 1,
        chunk_tokens: int = 128,
        max_turns: int = 10_000,
        max_sessions: int = 1000,
    ) -> None:
        require_vector_packages("Retrieval", "retrieval", default_embedder=embedder is None)
        if k < 1 or keep_recent_tokens < 0 or neighbours < 0 or chunk_tokens < 16 or max_turns < 1:
            raise ConfigError(
                "k must be >= 1, keep_recent_tokens and neighbours >= 0, chunk_tokens >= 16 and max_turns >= 1"
            )
        if documents is not None and (
            isinstance(documents, str) or not all(isinstance(document, str) for document in documents)
        ):
            raise ConfigError("documents must be a list of strings")
        self.embed = as_embedder(embedder)
        self.k = k
        self.keep_recent_tokens = keep_recent_tokens
        self.neighbours = neighbours
        self.chunk_tokens = chunk_tokens
        self.max_turns = max_turns
        self.documents = list(documents or [])
        self._tail = TailOnly()
        self._states: Sessions[_Memory] = Sessions(max_sessions)
        self._chunked: dict[str, _Memory] = {}  # the documents' chunks, per tokenizer
        self._chunk_lock = threading.Lock()

    def warmup(self) -> None:
        """Load the embedding model now (:meth:`tokenguard.Guard.warmup` calls this)."""
        self.embed(["warm up"])

    def fit(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int,
        tokenizer: Tokenizer,
        *,
        session: str | None = None,
        generate: Generate | None = None,
    ) -> list[dict[str, Any]]:
        def chosen(indices: Iterable[int]) -> list[dict[str, Any]]:
            return [dict(messages[i]) for i in indices]

        everything = self._tail.select(messages, max_tokens, tokenizer)  # raises InputTooLong
        older = self._older_turns(messages, everything)
        if not older and not self.documents:
            return chosen(everything)
        pinned = pinned_indices(messages, turn_indices_from_end(messages))
        if older:
            need = tokenizer.count_messages(chosen(sorted(pinned)))
            recent = min(self.keep_recent_tokens, (max_tokens - need) // 4)  # at most a quarter of the room
            tail = self._tail.select(messages, need + recent, tokenizer)
            older = self._older_turns(messages, tail)
        else:  # the conversation fits: sent whole, the documents get the room it leaves
            tail = everything

        def with_recall(text: str) -> list[dict[str, Any]]:
            return with_added(messages, tail, {"role": "system", "content": text})

        room = max_tokens - tokenizer.count_messages(with_recall(RECALLED_HEADER + "\n\n" + DOCUMENTS_HEADER))
        if room <= 0 or not (older or self.documents):
            return chosen(everything)

        memory = self._states.get(conversation_key(messages, session), lambda: _Memory(self.max_turns))
        keys = [turn_key([messages[i] for i in turn]) for turn in older]
        question = self._question(messages, pinned)
        vector = self.embed([question])[0] if question else None
        words = terms(question)
        documents = self._document_chunks(tokenizer) if self.documents else None
        with memory.lock:
            memory.add([(key, _turn_text(messages, turn)) for key, turn in zip(keys, older, strict=True)], self.embed)
            position = {key: p for p, key in enumerate(keys) if key in memory.items}  # the oldest may be evicted
            ranked = self._ranked(memory, vector, words, set(position))
            hits = [(score, key, True) for key, score in ranked]
            if documents is not None:
                hits += [(score, key, False) for key, score in self._ranked(documents, vector, words, None)]
            hits.sort(key=lambda hit: -hit[0])
            # The k best first, best first; then, with the room left, their neighbours.
            packed: list[tuple[int | None, _Item]] = []  # (position of a turn, item), in the order packed
            left = room
            for _, key, is_turn in hits[: self.k]:
                item = memory.items[key] if is_turn else documents.items[key]  # type: ignore[union-attr]
                if item.cost(tokenizer) <= left:
                    packed.append((position[key] if is_turn else None, item))
                    left -= item.cost(tokenizer)
            taken = {p for p, _ in packed if p is not None}
            for hit in [p for p, _ in packed if p is not None]:
                for p in [*range(hit - self.neighbours, hit), *range(hit + 1, hit + self.neighbours + 1)]:
                    item = memory.items.get(keys[p]) if 0 <= p < len(keys) and p not in taken else None
                    if item is not None and item.cost(tokenizer) <= left:
                        taken.add(p)
                        packed.append((p, item))
                        left -= item.cost(tokenizer)
        # Counted piece by piece, the lines may join into a few more tokens: shed the last packed until it fits.
        while packed:
            result = with_recall(_recalled_text(packed))
            if tokenizer.count_messages(result) <= max_tokens:
                return result
            packed.pop()
        return chosen(tail)

    @staticmethod
    def _question(messages: Sequence[Mapping[str, Any]], pinned: list[int]) -> str:
        """What recall searches with: the newest user message (the newest kept
        non-system message when there is none)."""
        said = [i for i in pinned if messages[i].get("role") == "user"] or [
            i for i in pinned if not is_instruction(messages[i])
        ]
        return content_text(messages[max(said)].get("content")) if said else ""

    @staticmethod
    def _older_turns(messages: Sequence[Mapping[str, Any]], kept: list[int]) -> list[list[int]]:
        """The turns older than the oldest kept non-system message, oldest first."""
        first = first_kept(messages, kept)
        older = [turn for turn in turn_indices_from_end(messages[:first]) if not is_instruction(messages[turn[0]])]
        return older[::-1]

    def _ranked(
        self, memory: _Memory, vector: np.ndarray | None, words: list[str], allowed: set[str] | None
    ) -> list[tuple[str, float]]:
        """``memory``'s keys (``allowed`` ones only, if given) that the question finds
        by meaning or by words, best first. The score is the cosine plus
        :data:`LEXICAL_WEIGHT` times the BM25 score relative to the best one (so a rare
        word or code shared with the question lifts a turn), plus :data:`SPEAKER_CUE`
        for turns of the speaker the question points at ("my ..." was said by the user,
        "you said ..." by the assistant)."""
        allowed = set(memory.items) if allowed is None else allowed
        reach = 4 * self.k
        dense = dict(memory.dense(vector, allowed, reach)) if vector is not None else {}
        lexical = dict(memory.lexical(words, allowed, reach))
        if vector is not None:  # a turn found by its words is scored by its meaning too
            dense |= memory.cosine(vector, lexical.keys() - dense.keys())
        best = max(lexical.values(), default=0.0) or 1.0
        speaker = _speaker(words)
        scores = {}
        for key in dense.keys() | lexical.keys():
            score = dense.get(key, 0.0) + LEXICAL_WEIGHT * lexical.get(key, 0.0) / best
            if speaker is not None and memory.items[key].text.startswith(speaker):
                score += SPEAKER_CUE
            scores[key] = score
        return sorted(scores.items(), key=lambda hit: -hit[1])

    def _document_chunks(self, tokenizer: Tokenizer) -> _Memory:
        with self._chunk_lock:
            memory = self._chunked.get(tokenizer.name)
            if memory is None:
                memory = _Memory(max_items=1 << 62)
                chunks = [
                    (f"document {d}:{c}", f"[document {d + 1}] {chunk}")
                    for d, document in enumerate(self.documents)
                    for c, chunk in enumerate(self._chunk(document, tokenizer))
                ]
                memory.add(chunks, self.embed)
                self._chunked[tokenizer.name] = memory
            return memory

    def _chunk(self, document: str, tokenizer: Tokenizer) -> list[str]:
        """``document`` in pieces of at most ``chunk_tokens``, cut between sentences
        where one fits (a longer sentence is cut where the tokens run out)."""
        sentences = [s for s in re.split(r"(?<=[.!?。！？\n])\s*", document) if s.strip()]
        chunks: list[str] = []
        current, size = "", 0
        for sentence in sentences:
            while sentence:
                piece = tokenizer.truncate(sentence, self.chunk_tokens)
                if not piece:  # one character over the limit on its own: take it anyway
                    piece = sentence[0]
                cost = tokenizer.count(piece)
                if current and size + cost > self.chunk_tokens:
                    chunks.append(current)
                    current, size = "", 0
                current = f"{current} {piece}" if current else piece
                size += cost + 1
                sentence = sentence[len(piece) :].lstrip()
        if current:
            chunks.append(current)
        return chunks

    def end_session(self, session: str) -> None:
        """Free ``session``'s index of turns."""
        self._states.drop(conversation_key((), session))

    def __repr__(self) -> str:
        return f"Retrieval(k={self.k}, keep_recent_tokens={self.keep_recent_tokens}, documents={len(self.documents)})"
