"""The ``tokenguard`` command line (also ``python -m tokenguard``).

- ``tokenguard count FILE|- [--model gpt-4o]``: the exact token count of a file or of
  standard input, and what that text costs as input where the model's price is known.
- ``tokenguard report LEDGER [--by user] [--since T] [--until T] [--format
  table|csv|json|html] [-o FILE]``: a ledger file's usage, grouped and summed
  (:meth:`tokenguard.Ledger.report`).
- ``tokenguard chat [--model PATH] [--max-tokens N] [--session NAME] ...``: an
  interactive chat on the bundled model (or a GGUF file or Hugging Face folder), reading
  lines from standard input, with a meter line after each answer.
- ``tokenguard demo``: the scripted tour of :mod:`tokenguard.demo` on the bundled model.
- ``tokenguard serve [--upstream URL --model M] [--keys FILE] [--budget-tokens N] ...``: an
  OpenAI-compatible HTTP gateway (:mod:`tokenguard.serve`) over the bundled model or an
  upstream server; ``tokenguard serve --keys FILE --add-key USER`` issues an API key.

Every subcommand is one :class:`Command` in :data:`COMMANDS`, the one place the parser
is built from.

A mistake (a bad option, an unknown model, a missing file) prints one line to stderr
and exits 2; an unexpected failure prints one line and exits 1. Neither prints a
traceback.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib.metadata
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from tokenguard.accounting import Ledger, Pricing
from tokenguard.accounting.report import REPORT_KEYS, Report, as_timestamp, format_usd, report_keys
from tokenguard.errors import TokenGuardError
from tokenguard.tokens import get_tokenizer

__all__ = ["COMMANDS", "CliError", "Command", "build_parser", "main"]

PROG = "tokenguard"
#: Exit codes: done; an unexpected failure; a mistake in the command (or its input).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_INTERRUPTED = 130


class CliError(Exception):
    """A mistake the user can fix, said in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (usage stays behind ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its one-line summary (``tokenguard --help``), its
    description (``tokenguard NAME --help``), what adds its arguments and what runs it
    (returning the exit code)."""

    name: str
    summary: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- count ---------------------------------------------------------------------------------


def _configure_count(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a text file, or - to read standard input")
    parser.add_argument(
        "-m", "--model", default="gpt-4o",
        help="a model name, an encoding (o200k_base, cl100k_base) or a tokenizer file: .model, tokenizer.json, "
             ".gguf (default: gpt-4o)",
    )
    parser.add_argument(
        "--encoding", default="utf-8-sig",
        help="the text's encoding (default: UTF-8, a leading byte-order mark not counted); "
             "bytes that do not decode are an error, not guessed",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the number of tokens")


def _read_text(name: str, encoding: str) -> str:
    """The whole of a file (or of stdin for ``-``), decoded strictly: a count of text
    with replaced bytes would not be the count of the file."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CliError(f"unknown encoding {encoding!r}") from None
    if name == "-":
        source, data = "standard input", _read_stdin()
    else:
        source = name
        try:
            data = Path(name).read_bytes()
        except FileNotFoundError:
            raise CliError(f"no such file: {name}") from None
        except IsADirectoryError:
            raise CliError(f"{name} is a directory, not a file") from None
        except OSError as error:
            raise CliError(f"cannot read {name}: {error.strerror or error}") from None
    if isinstance(data, str):
        return data
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        shown = "UTF-8" if encoding == "utf-8-sig" else encoding
        raise CliError(
            f"{source} is not {shown} text (byte {error.start} does not decode); "
            "pass --encoding, e.g. --encoding latin-1"
        ) from None


def _read_stdin() -> bytes | str:
    """Standard input's bytes (its text, when it is a text stream without bytes)."""
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer.read() if buffer is not None else sys.stdin.read()


def _run_count(args: argparse.Namespace) -> int:
    tokenizer = get_tokenizer(args.model)  # an unknown model fails before stdin is read
    tokens = tokenizer.count(_read_text(args.file, args.encoding))
    if args.quiet:
        print(tokens)
        return EXIT_OK
    source = "standard input" if args.file == "-" else args.file
    named = args.model if tokenizer.name == args.model else f"{args.model}, tokenizer {tokenizer.name}"
    print(f"{tokens:,} tokens in {source} ({named})")
    cost = Pricing().cost(args.model, tokens, 0, warn=False)
    if cost is None:
        print(f"input cost: unknown (no price is known for {args.model})")
    else:
        print(f"input cost: {format_usd(cost)} (this text sent as input, at {args.model}'s price)")
    return EXIT_OK


COUNT = Command(
    name="count",
    summary="exact token count of a file or stdin, with its input cost where the price is known",
    description="Count the tokens of a text file (or of standard input, with -) exactly, offline, with the "
                "model's own tokenizer, and price it as input where the model's price is known.",
    configure=_configure_count,
    run=_run_count,
)


# -- report --------------------------------------------------------------------------------

_FORMATS = ("table", "csv", "json", "html")


def _configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ledger", metavar="LEDGER", help="a SQLite ledger file (Ledger(path), Guard(ledger=path))")
    parser.add_argument(
        "--by", action="append", metavar="KEY",
        help=f"group by one or more of: {', '.join(REPORT_KEYS)}; repeat it or separate with commas "
             "(default: model)",
    )
    parser.add_argument(
        "--since", metavar="TIME",
        help="only calls made at or after TIME: a date (2025-06-01), a date-time (2025-06-01T14:00, UTC unless "
             "it has an offset) or epoch seconds",
    )
    parser.add_argument("--until", metavar="TIME", help="only calls made before TIME (same forms as --since)")
    parser.add_argument(
        "-f", "--format", choices=_FORMATS,
        help="table (aligned text), csv, json or html (one file with a chart; needs tokenguard[reports] and -o); "
             "default: from the -o file's suffix, else table",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")


# Columns every version of the ledger has had; an older ledger gains the newer ones on opening.
_LEDGER_CORE = frozenset({"ts", "request_id", "model", "input_tokens", "output_tokens", "stop_reason"})


def _existing_ledger(name: str) -> Path:
    """The ledger file ``name``, checked read-only: opening a missing path would create
    an empty ledger, and opening another SQLite file would add a table to it."""
    path = Path(name)
    if not path.exists():
        raise CliError(f"no ledger at {name}")
    if path.is_dir():
        raise CliError(f"{name} is a directory, not a ledger file")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    except sqlite3.Error as error:
        raise CliError(f"{name} is not a SQLite ledger ({error})") from None
    if "calls" not in tables:
        raise CliError(f"{name} is a SQLite file but not a tokenguard ledger (it has no 'calls' table)")
    if missing := sorted(_LEDGER_CORE - columns):
        # Another application's table: opening it as a ledger would add our columns to it.
        raise CliError(f"{name} has a 'calls' table, but not a tokenguard ledger's (no {', '.join(missing)} column)")
    return path


def _check_not_the_ledger(output: Path, ledger: Path) -> None:
    """Refuse an output file that is the ledger or one of SQLite's files beside it:
    writing the report there would destroy every recorded call."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        kept = ledger.with_name(ledger.name + suffix)
        if output.resolve() == kept.resolve() or (output.exists() and kept.exists() and output.samefile(kept)):
            raise CliError(f"-o {output} would overwrite the ledger's file {kept}: write the report to another file")


def _format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    suffix = Path(args.output).suffix.lower().lstrip(".") if args.output else ""
    return suffix if suffix in _FORMATS else "table"


def _render(report: Report, fmt: str) -> str:
    renderers: dict[str, Callable[[], str]] = {
        "table": report.to_text,
        "csv": report.to_csv,
        "json": report.to_json,
        "html": report.to_html,
    }
    return renderers[fmt]()


def _run_report(args: argparse.Namespace) -> int:
    fmt = _format(args)
    if fmt == "html" and args.output is None:
        raise CliError("--format html writes a file: add -o FILE")
    by = report_keys(args.by or ["model"])
    since, until = as_timestamp(args.since), as_timestamp(args.until)
    ledger_path = _existing_ledger(args.ledger)
    if args.output is not None:
        _check_not_the_ledger(Path(args.output), ledger_path)
    with Ledger(ledger_path) as ledger:
        report = ledger.report(by, since=since, until=until)
    text = _render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as error:
            raise CliError(f"cannot write {args.output}: {error.strerror or error}") from None
        print(f"wrote {args.output}: {len(report)} rows, {report.totals['calls']} calls", file=sys.stderr)
    return EXIT_OK


REPORT = Command(
    name="report",
    summary="a ledger's usage grouped by user, session, model, tag, day, ...",
    description="Sum a ledger's calls per group: calls, tokens, cost (unknown, never 0, where a price is "
                "unknown), savings, cache hit rate, p50/p95 latency, errors and refusals.",
    configure=_configure_report,
    run=_run_report,
)


# -- chat ----------------------------------------------------------------------------------

_QUIT = ("/quit", "/exit")
_NEW = "/new"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _configure_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m", "--model", metavar="PATH",
        help="a .gguf file or a Hugging Face checkpoint folder of the Llama family "
             "(default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--max-tokens", type=_positive, default=256, metavar="N",
                        help="the most tokens an answer may have (default: 256)")
    parser.add_argument("--session", default="chat", metavar="NAME",
                        help="the session's name in the ledger (default: chat)")
    parser.add_argument("--max-context-tokens", type=_positive, metavar="N",
                        help="fit the history into N prompt tokens (default: the model's window)")
    parser.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    parser.add_argument("--ledger", metavar="FILE",
                        help="also write every call to this SQLite ledger (read it with tokenguard report)")


def _read_lines() -> Iterator[str]:
    """Standard input's lines, prompting for each when a person types them."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            if interactive:
                print()
            return
        yield line.strip()


def _run_chat(args: argparse.Namespace) -> int:
    from tokenguard._guard import Guard
    from tokenguard.backends import BundledRunner
    from tokenguard.cache import ExactCache
    from tokenguard.demo import loading, meter_line, strategy_name

    if args.model is not None and not Path(args.model).exists():
        raise CliError(f"no model at {args.model} (pass a .gguf file or a checkpoint folder)")
    backend = BundledRunner(model=args.model)
    session, total, conversations = args.session, 0, 1
    with contextlib.ExitStack() as stack:
        cache = ExactCache()
        stack.callback(cache.close)
        guard = Guard(backend, max_output_tokens=args.max_tokens, max_context_tokens=args.max_context_tokens,
                      prices={backend.model: (0.0, 0.0)}, cache=cache, ledger=args.ledger)
        stack.callback(guard.close)  # the model and the ledger
        with loading(1) as step:
            step(f"model {Path(backend.model).name}", guard.warmup)
        strategy = strategy_name(guard)
        print(f"chatting with {Path(backend.model).name} (session {session!r}); /new starts over, /quit or "
              "end of input ends", file=sys.stderr)
        for line in _read_lines():
            if not line:
                continue
            if line in _QUIT:
                break
            if line == _NEW:  # a session of its own: its meter and its ledger rows start afresh
                guard.end_session(session)
                conversations += 1
                session, total = f"{args.session}-{conversations}", 0
                print(f"(a new conversation: session {session!r})", flush=True)
                continue
            history = guard.history.get(session)
            if not history and args.system:
                guard.history.append(session, {"role": "system", "content": args.system})
                history = guard.history.get(session)
            print("assistant> ", end="", flush=True)
            try:
                with guard.chat_stream(line, session=session) as stream:
                    for piece in stream:
                        print(piece, end="", flush=True)
                reply = stream.reply
            except TokenGuardError as error:  # a refused turn (too long, ...): the chat goes on
                print()
                print(f"{PROG} chat: error: {_one_line(error)}", file=sys.stderr)
                continue
            print()
            if reply is None:
                continue
            total += reply.usage.total_tokens
            print(meter_line(reply, strategy=strategy, cache=True, session_tokens=total, given=len(history) + 1),
                  flush=True)
    return EXIT_OK


CHAT = Command(
    name="chat",
    summary="an interactive chat on the bundled model, with a meter line after each answer",
    description="Chat on the bundled SmolLM2-135M-Instruct (or --model PATH), offline, one line of standard "
                "input per turn; /new starts a new conversation, /quit or end of input ends. After each answer "
                "a meter line shows its exact input and output tokens, the context strategy, the cache, the "
                "cost and the session's total.",
    configure=_configure_chat,
    run=_run_chat,
)


# -- demo ----------------------------------------------------------------------------------


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no loading bar on stderr")


def _run_demo(args: argparse.Namespace) -> int:
    from tokenguard.demo import run

    return run(progress=not args.no_progress)


DEMO = Command(
    name="demo",
    summary="a scripted session on the bundled model: counts, context, cache, loop stop, budget, nesting, report",
    description="Run a scripted multi-turn session on the bundled model (about a minute on a laptop CPU) that "
                "shows, with the numbers it measures: exact token counts (Chinese included), context fitting, a "
                "cache hit, a repetition stop, a budget refusal and a nested call, then the ledger's cost report.",
    configure=_configure_demo,
    run=_run_demo,
)


# -- serve ---------------------------------------------------------------------------------

_BUDGET_SCOPES = ("user", "session", "global")
_WINDOWS = ("hour", "day", "month")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a price in US dollars, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a price >= 0, got {text}")
    return value


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where and whom to serve")
    where.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    where.add_argument("--port", type=_port, default=8000, help="the port to listen on (default: 8000; 0 picks one)")
    where.add_argument("--keys", metavar="FILE",
                       help="a key file (JSON lines of user and SHA-256 of the key): every request must send "
                            "'Authorization: Bearer KEY' and is metered for the key's user. Without it the gateway "
                            "is open and the user is the request's 'user' field")
    where.add_argument("--add-key", metavar="USER",
                       help="issue a new key for USER: append its hash to the --keys file (created if missing), "
                            "print the key once, and exit")
    backend = parser.add_argument_group("the model")
    backend.add_argument("--upstream", metavar="URL",
                         help="an OpenAI-compatible server to forward to (vLLM, TGI, llama.cpp, Ollama, OpenAI), e.g. "
                              "http://127.0.0.1:8001/v1; its API key is read from $TOKENGUARD_UPSTREAM_API_KEY. "
                              "Default: the bundled model, run here")
    backend.add_argument("-m", "--model", metavar="M",
                         help="with --upstream, the model name it serves (required); without, a .gguf file or Hugging "
                              "Face folder to run instead of the bundled SmolLM2-135M-Instruct")
    backend.add_argument("--tokenizer", metavar="NAME",
                         help="with --upstream, what counts the model's tokens when tokenguard does not know the "
                              "model: an encoding (o200k_base, ...) or a tokenizer.json, .model or .gguf file")
    backend.add_argument("--price", nargs=2, type=_usd, metavar=("IN", "OUT"),
                         help="US dollars per million input and output tokens, where tokenguard does not know the "
                              "model's price (the bundled model costs 0)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--budget-tokens", type=_whole, metavar="N",
                        help="a token budget (input + output): a request whose worst case does not fit is refused "
                             "with 429 before the model runs")
    limits.add_argument("--budget-per", choices=_BUDGET_SCOPES, default="user",
                        help="whom the budget limits: each user (default), each session (the X-Session-Id header) "
                             "or everyone together")
    limits.add_argument("--budget-window", choices=_WINDOWS,
                        help="renew the budget every UTC hour, day or month (default: never)")
    limits.add_argument("--budget-store", metavar="FILE",
                        help="keep the budget in this SQLite file or redis:// URL, shared by processes (and hosts, "
                             "on Redis) and kept across restarts (default: in memory)")
    limits.add_argument("--max-input-tokens", type=_whole, metavar="N",
                        help="refuse requests whose input is longer (400, context_length_exceeded)")
    limits.add_argument("--max-output-tokens", type=_whole, default=512, metavar="N",
                        help="the most tokens an answer may have; a request's max_tokens may lower it (default: 512)")
    limits.add_argument("--max-body-bytes", type=_positive, default=4 << 20, metavar="N",
                        help="refuse larger request bodies unread (413; default: 4 MiB)")
    records = parser.add_argument_group("records")
    records.add_argument("--ledger", metavar="FILE",
                         help="write every call to this SQLite ledger (read it with tokenguard report); default: in "
                              "memory, lost at exit")
    records.add_argument("--cache", metavar="DIR",
                         help="answer repeated deterministic requests from this exact cache, per user, at no token "
                              "cost")
    records.add_argument("--access-log", action="store_true", help="log every HTTP request on stderr")


def _run_serve(args: argparse.Namespace) -> int:
    from tokenguard.serve import ServeOptions, add_key, serve

    if args.add_key is not None:
        if args.keys is None:
            raise CliError("--add-key needs --keys FILE: the key file to add the key to")
        key = add_key(args.keys, args.add_key)
        print(key)
        print(f"added a key for {args.add_key} to {args.keys}; it is shown only now", file=sys.stderr)
        return EXIT_OK
    if args.upstream is None and args.model is not None and not Path(args.model).exists():
        raise CliError(f"no model at {args.model} (pass a .gguf file or a checkpoint folder, or --upstream URL)")
    if args.upstream is not None and args.model is None:
        raise CliError("--upstream needs --model: the model name the upstream server serves")
    options = ServeOptions(
        host=args.host, port=args.port, keys=args.keys, ledger=args.ledger, budget_tokens=args.budget_tokens,
        budget_per=args.budget_per, budget_window=args.budget_window, budget_store=args.budget_store,
        max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens, cache=args.cache,
        upstream=args.upstream, model=args.model, tokenizer=args.tokenizer,
        price=(args.price[0], args.price[1]) if args.price else None, max_body_bytes=args.max_body_bytes,
        access_log=args.access_log,
    )
    serve(options, announce=lambda line: print(f"{PROG} serve: {line}", file=sys.stderr, flush=True))
    return EXIT_OK


SERVE = Command(
    name="serve",
    summary="an OpenAI-compatible HTTP gateway: per-user keys, budgets, cache, ledger and /metrics",
    description="Serve the bundled model (or, with --upstream, any OpenAI-compatible server) over OpenAI's API: "
                "POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models, /health and "
                "Prometheus /metrics. Every request is one guarded call: exact token counts, input and output caps, "
                "budgets (429 when spent), an exact cache and one ledger row, per user. Needs the web stack: "
                "pip install 'tokenguard[serve]'.",
    configure=_configure_serve,
    run=_run_serve,
)


# -- the command line ----------------------------------------------------------------------

#: Every subcommand, in the order ``--help`` lists them.
COMMANDS: list[Command] = [COUNT, REPORT, CHAT, DEMO, SERVE]


def _version() -> str:
    try:
        return importlib.metadata.version("tokenguard")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in :data:`COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description="Exact offline token counts, usage reports of tokenguard ledgers, a metered chat and demo "
                    "on the bundled model, and an OpenAI-compatible gateway.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.summary, description=command.description)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _fail(command: str | None, message: str, code: int) -> int:
    print(f"{PROG}{f' {command}' if command else ''}: error: {message}", file=sys.stderr)
    return code


def _quiet_stdout() -> None:
    """After a closed pipe (``tokenguard report ... | head``): send what is left to
    /dev/null, so that Python's exit does not report the closed pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error(f"choose a command: {', '.join(command.name for command in COMMANDS)}")
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", _INTERRUPTED)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_FAILED
    except (CliError, TokenGuardError, OSError) as error:
        return _fail(args.command, _one_line(error), EXIT_USAGE)
    except Exception as error:  # noqa: BLE001 - a command line prints one line, never a traceback
        return _fail(args.command, f"unexpected {type(error).__name__}: {_one_line(error)}", EXIT_FAILED)
