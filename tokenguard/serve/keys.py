"""Who is calling: API keys mapped to users by a key file that holds only key hashes.

The file has one JSON object per line, ``{"user": "alice", "sha256": "<hex>", "created":
"..."}``; blank lines and lines starting with ``#`` are ignored, so a person can edit
it. A key is never stored: a leaked key file names users but opens nothing. A user may
have several keys (rotation); deleting a key's line revokes it, and a running server
picks the change up within a second (:meth:`KeyFile.user_of` rereads a file whose
modification time or size changed).

``tokenguard serve --keys FILE --add-key USER`` (:func:`add_key`) makes a new random
key, appends its hash and prints the key once.

Lookup is a dictionary lookup by the SHA-256 of the presented key: an attacker who
times it learns about hashes of their own guesses, not about any stored key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tokenguard.errors import ConfigError

__all__ = ["KEY_PREFIX", "KeyFile", "add_key", "hash_key", "new_key"]

logger = logging.getLogger(__name__)

#: Keys this module makes start with it, so a leaked one is easy to recognise in logs.
KEY_PREFIX = "tg-"
_MAX_USER_CHARS = 128
_RECHECK_S = 1.0  # how often the file's modification time is looked at, at most


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a key file stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A new random key: ``tg-`` and 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_user(user: str) -> str:
    """``user`` if it is a usable name (1-128 printable characters, not only spaces)."""
    if not user.strip() or len(user) > _MAX_USER_CHARS or not user.isprintable():
        raise ConfigError(f"a user name is 1 to {_MAX_USER_CHARS} printable characters, got {user!r}")
    return user


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What tells a changed file from an unchanged one."""

    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> _Stamp:
        stat = path.stat()
        return cls(stat.st_mtime_ns, stat.st_size)


def _parse(path: Path, text: str) -> dict[str, str]:
    """The file's ``{sha256: user}``; a line that is not an entry raises ConfigError naming it."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{where} is not JSON; a key file line is {{\"user\": ..., \"sha256\": ...}}") from None
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a JSON object")
        user, digest = entry.get("user"), entry.get("sha256")
        if not isinstance(user, str):
            raise ConfigError(f"{where} has no \"user\" string")
        try:
            check_user(user)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: \"sha256\" must be 64 lowercase hex digits (the hash, never the key)")
        if digest in users:
            raise ConfigError(f"{where} repeats a key hash already given to {users[digest]!r}")
        users[digest] = user
    return users


class KeyFile:
    """The users of a key file, by key. Loading it checks every line (a mistake raises
    :class:`~tokenguard.ConfigError` naming the line); later changes are picked up by
    :meth:`user_of`, which looks at the file's modification time and size at most every
    ``recheck_s`` seconds. A changed file that does not parse keeps the last good table
    (logged), rather than locking every user out.

    >>> keys = KeyFile("keys.jsonl")  # doctest: +SKIP
    >>> keys.user_of("tg-...")        # doctest: +SKIP
    'alice'
    """

    def __init__(self, path: str | os.PathLike[str], *, recheck_s: float = _RECHECK_S) -> None:
        self.path = Path(path)
        self.recheck_s = recheck_s
        try:
            self._stamp = _Stamp.of(self.path)
            self._users = _parse(self.path, self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"no key file at {self.path}; create one with: tokenguard serve --keys {self.path} --add-key USER"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the key file {self.path}: {error}") from None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def users(self) -> set[str]:
        """Every user that has at least one key."""
        return set(self._users.values())

    def __len__(self) -> int:
        """The number of keys."""
        return len(self._users)

    def user_of(self, key: str) -> str | None:
        """The user ``key`` belongs to, or ``None`` for a key the file does not hold."""
        if time.monotonic() - self._checked >= self.recheck_s:
            self._reload()
        return self._users.get(hash_key(key))

    def _reload(self) -> None:
        with self._lock:
            self._checked = time.monotonic()
            try:
                stamp = _Stamp.of(self.path)
                if stamp == self._stamp:
                    return
                users = _parse(self.path, self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                logger.error("key file %s is gone; every key is now refused until it is back", self.path)
                self._users, self._stamp = {}, _Stamp(-1, -1)
                return
            except (ConfigError, OSError, UnicodeDecodeError) as error:
                logger.error("key file %s changed but cannot be read, keeping the last good keys: %s", self.path, error)
                return
            self._users, self._stamp = users, stamp
            logger.info("key file %s reloaded: %d keys", self.path, len(users))

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r}, {len(self)} keys)"


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a line break."""
    with path.open("rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def add_key(path: str | os.PathLike[str], user: str) -> str:
    """Make a new key for ``user``, append its hash to the key file at ``path`` (created,
    readable by its owner only, when missing) and return the key: the only time it is
    ever seen. An existing file is checked first, so a broken file is not extended."""
    check_user(user)
    target = Path(path)
    separator = ""
    if target.exists():
        KeyFile(target)  # raises on a file that is not a key file
        if not _ends_a_line(target):
            separator = "\n"  # a hand-edited last line without its line break
    key = new_key()
    entry = {"user": user, "sha256": hash_key(key), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    line = separator + json.dumps(entry, ensure_ascii=False) + "\n"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as error:
        raise ConfigError(f"cannot write the key file {target}: {error.strerror or error}") from None
    with os.fdopen(fd, "a", encoding="utf-8") as file:
        file.write(line)
    return key
