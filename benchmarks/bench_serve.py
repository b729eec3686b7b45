"""Overhead of `tokenguard serve` in front of an OpenAI-compatible server: the latency a
client sees through the gateway against calling the upstream directly, at 1, 16 and 64
concurrent clients, for whole (JSON) and streamed (SSE) answers.

    python benchmarks/bench_serve.py [--requests 3000] [--clients 1,16,64] [--upstream-ms 20,0]
                                     [--ledger] [--profile]

Three processes share the machine: a minimal upstream (raw asyncio HTTP/1.1, a fixed
six-word answer, ~30 µs of CPU a request), the gateway (`create_app` over
`OpenAICompatible`, served by uvicorn: a key file, a per-user token budget, the
in-memory ledger, or a SQLite one with --ledger) and this process, which drives
keep-alive connections over raw sockets so that the client costs as little CPU as it
can. Each client sends its next request as soon as its answer is in; a request's
latency is from its first byte sent to its last byte received.

Two regimes, one table each (--upstream-ms):

- the upstream answers after a fixed delay (20 ms: a fast model server's short answer),
  so the gateway sees the load 1, 16 or 64 users make and the "added" latency is what
  the gateway itself costs a request, waits for the loop included;
- the upstream answers at once (0 ms): the clients then keep the gateway busy all the
  time, and the table measures its capacity, not its cost: a request waits for every
  other client's, so the added p50 is about clients x the gateway's CPU a request.

"added" is the gateway's p50 (p99) minus the direct p50 (p99); "x" the ratio of the
two. "gw CPU" is the gateway process's CPU time per request (user + system, from
/proc). With --profile the gateway also runs once under cProfile (every thread) and
its time is summed per area (uvicorn, starlette, aiohttp, the guard's steps, ...).

Target: p50 added under 1 ms and p99 added under 5 ms at 16 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import pstats
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "gpt-4o-mini"
WORDS = ["Paris", " is", " the", " capital", " of", " France."]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_TOKENS = 14


def _fast_loop() -> None:
    """uvloop when it is installed (uvicorn picks it too)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- the upstream: a minimal OpenAI-compatible server ----------------------------------------


def _upstream_answer(body: dict[str, object]) -> bytes:
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(WORDS),
             "total_tokens": PROMPT_TOKENS + len(WORDS)}
    if not body.get("stream"):
        data = json.dumps({"id": "u", "object": "chat.completion", "created": 0, "model": MODEL, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"}],
            "usage": usage}).encode()
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(data)).encode() + b"\r\n\r\n" + data)
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in WORDS]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    options: Any = body.get("stream_options") or {}
    if options.get("include_usage"):
        events.append({"choices": [], "usage": usage})
    payload = b"".join(b"data: " + json.dumps({"id": "u", "object": "chat.completion.chunk", "model": MODEL, **e})
                       .encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunked


# The upstream's delays, as fractions of --delay-ms: evenly spread over 0.5-1.5 (equal
# delays would keep the clients in step, a convoy no real traffic makes), in a fixed
# shuffled cycle, so that any DELAY_CYCLE requests in a row, direct or through the
# gateway, wait the very same delays between them.
DELAY_CYCLE = 64
_DELAY_FRACTIONS = [0.5 + (i + 0.5) / DELAY_CYCLE for i in range(DELAY_CYCLE)]
random.Random(0).shuffle(_DELAY_FRACTIONS)
delays = itertools.cycle(_DELAY_FRACTIONS)


async def _upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if delay_s:
                await asyncio.sleep(next(delays) * delay_s)
            writer.write(_upstream_answer(body))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_upstream(delay_s: float) -> None:
    server = await asyncio.start_server(functools.partial(_upstream_connection, delay_s=delay_s),
                                        "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- the gateway -------------------------------------------------------------------------------


def _profile_every_thread() -> list[object]:
    """Start cProfile in this thread and in every thread started from now on."""
    import cProfile

    profiles: list[cProfile.Profile] = []

    def start(*_: object) -> None:  # the first profile event of a new thread
        profile = cProfile.Profile(time.thread_time)  # CPU time: a thread waiting costs nothing
        profiles.append(profile)
        profile.enable()  # replaces this hook for the thread

    threading.setprofile(start)
    start()
    return profiles  # type: ignore[return-value]


async def _words(messages: object, max_tokens: int) -> AsyncIterator[str]:
    """The upstream's answer, from a function: the gateway without an HTTP client."""
    for word in WORDS:
        yield word


def _bare_app() -> Any:
    """The floor: uvicorn and Starlette answering a fixed completion, no guard, no upstream."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answer = _upstream_answer({}).split(b"\r\n\r\n", 1)[1]

    async def complete(request: Request) -> Response:
        json.loads(await request.body())
        return Response(answer, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", complete, methods=["POST"])])


def _bare_proxy(upstream: str) -> Any:
    """The floor of any Python gateway: Starlette forwarding the body to the upstream
    with aiohttp and its answer back, nothing read, counted or checked."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    sessions: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            sessions.append(session)
            yield

    async def forward(request: Request) -> Response:
        async with sessions[0].post(f"{upstream}/chat/completions", data=await request.body(),
                                    headers={"content-type": "application/json"}) as answer:
            return Response(await answer.read(), answer.status, media_type=answer.content_type)

    return Starlette(routes=[Route("/v1/chat/completions", forward, methods=["POST"])], lifespan=lifespan)


def _serve_gateway(upstream: str, keys: str, ledger: str | None, profile: str | None, variant: str) -> None:
    import uvicorn

    import tokenguard as tg
    from tokenguard.backends import OpenAICompatible
    from tokenguard.serve import KeyFile, create_app
    from tokenguard.serve.server import listen

    if variant == "bare":
        app = _bare_app()
    elif variant == "bare-proxy":
        app = _bare_proxy(upstream)
    else:
        backend: Any = _words if variant == "function" else OpenAICompatible(upstream, MODEL)
        options: dict[str, Any] = {"stop": None} if variant in ("no-stop", "function") else {}
        guard = tg.Guard(backend, model=MODEL, max_output_tokens=64, ledger=ledger,
                         budget=tg.Budget(tokens=10**15, per="user"), **options)
        guard.warmup()  # the tokenizer's load is start-up, not a request's time
        app = create_app(guard, keys=KeyFile(keys))
    profiles = _profile_every_thread() if profile else []
    sock = listen("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if profile:
        stats = pstats.Stats(profiles[0])  # type: ignore[arg-type]
        for more in profiles[1:]:
            with contextlib.suppress(TypeError):  # a thread that never ran Python code
                stats.add(more)  # type: ignore[arg-type]
        stats.dump_stats(profile)


# -- the clients -------------------------------------------------------------------------------


def _request(port: int, key: str | None, stream: bool) -> bytes:
    body: dict[str, object] = {"model": MODEL, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    auth = f"authorization: Bearer {key}\r\n".encode() if key else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:" + str(port).encode()
            + b"\r\ncontent-type: application/json\r\n" + auth + b"content-length: " + str(len(data)).encode()
            + b"\r\n\r\n" + data)


async def _read_answer(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not a 200 answer: {head[:200]!r}")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
            return
    raise RuntimeError("an answer without a length")


async def _drive(port: int, request: bytes, clients: int, total: int) -> tuple[list[float], float]:
    """``total`` requests over ``clients`` keep-alive connections: each one's latency (s)
    and the wall time of the whole run."""
    latencies: list[float] = []
    left = total

    async def client() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                start = time.perf_counter()
                writer.write(request)
                await _read_answer(reader)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


def _cpu_s(pid: int) -> float:
    """CPU seconds process ``pid``'s live threads have run so far (from each thread's
    schedstat, in nanoseconds: /proc/PID/stat counts in 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Run:
    latencies: list[float]
    wall_s: float
    cpu_s: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s


def _measure(port: int, request: bytes, clients: int, total: int, pid: int) -> Run:
    asyncio.run(_drive(port, request, clients, min(total, 200)))  # warm: connections, caches
    before = _cpu_s(pid)
    latencies, wall = asyncio.run(_drive(port, request, clients, total))
    return Run(latencies, wall, _cpu_s(pid) - before)


# -- orchestration -----------------------------------------------------------------------------


@contextlib.contextmanager
def _process(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """This script in another role; yields it and the port it printed."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"{args[:2]} did not start")
        yield proc, int(line)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(port: int, request: bytes) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            asyncio.run(_drive(port, request, 1, 1))
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


AREAS = [  # (area, substrings of a function's file), first match wins
    ("uvicorn + httptools (HTTP server)", ("uvicorn", "httptools")),
    ("starlette (routing, request)", ("starlette",)),
    ("aiohttp (client to upstream)", ("aiohttp", "yarl", "multidict")),
    ("tokenguard.serve (parse, auth, answer)", ("tokenguard/serve",)),
    ("tokenguard backends (SSE parse)", ("tokenguard/backends",)),
    ("tokenguard pipeline (the guard's steps)", ("tokenguard/pipeline", "tokenguard/_guard", "tokenguard/_repetition",
                                                 "tokenguard/telemetry")),
    ("tokenguard ledger, budget, prices", ("tokenguard/accounting", "tokenguard/stores")),
    ("tokenguard token counting", ("tokenguard/tokens", "tiktoken", "regex")),
    ("json", ("json/",)),
    ("asyncio + threads", ("asyncio", "threading", "concurrent", "queue", "uvloop")),
]


# Where an idle worker thread waits for work: the profiler charges it the whole wait
# (seconds a run) though the thread sleeps, so it is left out of the sums.
IDLE_WAITS = ("of '_queue.SimpleQueue' objects", "of '_thread.lock' objects")


def _areas(path: str) -> list[tuple[str, float]]:
    stats = pstats.Stats(path)
    totals: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename if filename != "~" else name
        if any(wait in where for wait in IDLE_WAITS):
            continue
        area = next((label for label, keys in AREAS if any(k in where for k in keys)), "other (builtins, C calls)")
        totals[area] = totals.get(area, 0.0) + tottime
    return sorted(totals.items(), key=lambda item: -item[1])


VARIANTS = [
    ("bare", "uvicorn + Starlette answering a fixed completion (no guard, no upstream)"),
    ("bare-proxy", "uvicorn + Starlette passing requests to the upstream with aiohttp (the floor)"),
    ("function", "tokenguard serve and the guard over a function backend (no RepetitionStop)"),
    ("no-stop", "+ the upstream through OpenAICompatible (aiohttp) instead of the function"),
    ("full", "+ RepetitionStop: the guard's defaults (the gateway of the tables above)"),
]


def _row_requests(args: argparse.Namespace, clients: int, delay_ms: float) -> int:
    """A row's requests: --requests, fewer where --seconds would not hold them all at
    this delay, and a whole number of delay cycles (the same delays either way)."""
    fit = args.seconds * clients / (delay_ms / 1e3) if delay_ms else args.requests
    return max(DELAY_CYCLE, int(min(args.requests, fit)) // DELAY_CYCLE * DELAY_CYCLE)


def _table(args: argparse.Namespace, key: str, gateway_args: list[str], up_port: int, delay_ms: float) -> None:
    """Direct and through the gateway, each mode and number of clients: one table, with
    the same rows for the floor (a bare proxy, JSON answers) under it."""
    if delay_ms:
        print(f"\nthe upstream answers in {delay_ms / 2:g}-{delay_ms * 1.5:g} ms: the load of that many users "
              "(the target's regime)")
    else:
        print("\nthe upstream answers at once: the clients keep the gateway busy (its capacity; "
              "added ~ clients x CPU/req)")
    header = (f"{'':11} {'mode':6} {'clients':>7} | {'direct p50':>10} {'p99':>7} | {'gateway p50':>11} {'p99':>7} | "
              f"{'added p50':>9} {'p99':>7} | {'x p50':>6} {'x p99':>6} | {'gw req/s':>8} {'gw CPU/req':>10}")
    print(header)
    print("-" * len(header))
    for variant, modes in (("full", args.modes.split(",")), ("bare-proxy", ["json"])):
        for row in _rows(args, key, [*gateway_args, "--variant", variant], up_port, delay_ms, modes):
            print(f"{'gateway' if variant == 'full' else 'floor':11} {row}", flush=True)


def _rows(args: argparse.Namespace, key: str, gateway_args: list[str], up_port: int, delay_ms: float,
          modes: list[str]) -> Iterator[str]:
    with _process(*gateway_args) as (gw, gw_port):
        for mode in modes:
            direct_req = _request(up_port, None, mode == "stream")
            gateway_req = _request(gw_port, key, mode == "stream")
            _wait_ready(gw_port, gateway_req)
            for clients in (int(c) for c in args.clients.split(",")):
                total = _row_requests(args, clients, delay_ms)
                direct = _measure(up_port, direct_req, clients, total, os.getpid())
                through = _measure(gw_port, gateway_req, clients, total, gw.pid)
                d50, d99, g50, g99 = direct.pct(0.5), direct.pct(0.99), through.pct(0.5), through.pct(0.99)
                yield (f"{mode:6} {clients:>7} | {d50:>8.3f}ms {d99:>5.2f}ms | {g50:>9.3f}ms {g99:>5.2f}ms "
                       f"| {g50 - d50:>7.3f}ms {g99 - d99:>5.2f}ms | {g50 / d50:>5.1f}x {g99 / d99:>5.1f}x "
                       f"| {through.rate:>8.0f} {through.cpu_s / len(through.latencies) * 1e6:>8.0f}µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per row (default 3000)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="fewer requests a row where more would take longer (default 10)")
    parser.add_argument("--clients", default="1,16,64", help="concurrent clients per row (default 1,16,64)")
    parser.add_argument("--upstream-ms", default="20,0",
                        help="the upstream's answer delays, one table each (default 20,0)")
    parser.add_argument("--modes", default="json,stream", help="json, stream or both (default)")
    parser.add_argument("--ledger", action="store_true", help="a SQLite ledger instead of the in-memory one")
    parser.add_argument("--profile", action="store_true", help="also profile the gateway at 16 clients")
    parser.add_argument("--role", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--ledger-file", help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _fast_loop()
    if args.role == "upstream":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_upstream(args.delay_ms / 1e3))
        return
    if args.role == "gateway":
        _serve_gateway(args.upstream, args.keys, args.ledger_file, args.profile_file, args.variant)
        return

    from tokenguard.serve import add_key

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; ledger: {'SQLite' if args.ledger else 'in memory'}; "
          f"{args.requests} requests a row, or {args.seconds:g} s of them")
    with tempfile.TemporaryDirectory() as tmp:
        keys = str(Path(tmp) / "keys.jsonl")
        key = add_key(keys, "bench")

        def gateway_args(up_port: int) -> list[str]:
            more = ["--ledger-file", str(Path(tmp) / "usage.sqlite")] if args.ledger else []
            return ["--role", "gateway", "--upstream", f"http://127.0.0.1:{up_port}/v1", "--keys", keys, *more]

        for delay_ms in (float(d) for d in args.upstream_ms.split(",")):
            with _process("--role", "upstream", "--delay-ms", str(delay_ms)) as (_, up_port):
                _table(args, key, gateway_args(up_port), up_port, delay_ms)
        with _process("--role", "upstream") as (_, up_port):
            _where_the_time_goes(args, key, gateway_args(up_port))


def _where_the_time_goes(args: argparse.Namespace, key: str, gateway_args: list[str]) -> None:
    """The gateway's CPU a request and its p50 as its layers are added, at saturation;
    with --profile, its time by area under cProfile."""
    print(f"\nwhere the gateway's time goes, json answers from an upstream that answers at once "
          f"({args.requests} requests a column):")
    print(f"  {'':78} {'CPU/req':>8} {'p50 @1':>8} {'p50 @16':>8}")
    for variant, label in VARIANTS:
        with _process(*gateway_args, "--variant", variant) as (gw, gw_port):
            request = _request(gw_port, key, False)
            _wait_ready(gw_port, request)
            alone = _measure(gw_port, request, 1, args.requests, gw.pid)
            loaded = _measure(gw_port, request, 16, args.requests, gw.pid)
        print(f"  {label:78} {loaded.cpu_s / len(loaded.latencies) * 1e6:>5.0f} µs {alone.pct(0.5):>5.2f} ms "
              f"{loaded.pct(0.5):>5.2f} ms")
    if args.profile:
        profile_file = str(Path(tempfile.gettempdir()) / f"bench_serve_gateway_{os.getpid()}.prof")
        with _process(*gateway_args, "--profile-file", profile_file) as (gw, gw_port):
            request = _request(gw_port, key, False)
            _wait_ready(gw_port, request)
            _measure(gw_port, request, 16, args.requests, gw.pid)
        total = sum(t for _, t in _areas(profile_file))
        print(f"\nwhere the gateway's time goes (cProfile, every thread, json at 16 clients; own time, "
              f"{total / (args.requests + 200) * 1e6:.0f} µs a request under the profiler):")
        for area, seconds in _areas(profile_file):
            print(f"  {area:45} {seconds / total:6.1%}")
        os.unlink(profile_file)


if __name__ == "__main__":
    main()
