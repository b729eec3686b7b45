"""The command line: `tokenguard count` and `tokenguard report`, run in-process through
`main([...])` and as `python -m tokenguard` in a subprocess, on real files, real
tokenizers and real SQLite ledgers written by a real Guard."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from tokenguard import Guard, Ledger, count_tokens
from tokenguard.accounting import Pricing
from tokenguard.accounting.report import format_usd
from tokenguard.cli import COMMANDS, main

DAY1 = datetime(2025, 6, 1, 9, 30, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2025, 6, 2, 14, 5, tzinfo=timezone.utc).timestamp()
ZH = "人工智能"


def tokenguard(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m tokenguard ARGS` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenguard", *args], input=stdin, capture_output=True, timeout=120
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def answer(messages, *, max_tokens):
    return f"An answer to: {messages[-1]['content']}"


@pytest.fixture
def ledger_path(tmp_path):
    """A ledger file with ann's and bob's calls on two days (one model without a price)."""
    path = tmp_path / "usage.sqlite"
    with Ledger(path) as ledger:
        guard = Guard(answer, model="gpt-4o", ledger=ledger)
        for ts, prompt, user in ((DAY1, "What is a KV cache?", "ann"), (DAY1 + 5, "And paging?", "ann"),
                                 (DAY2, "Summarise the week.", "bob")):
            call = guard.prepare(prompt, user=user)
            call.ts = ts
            guard.open_stream(call).read()
    return path


def one_error_line(stderr: str, command: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tokenguard{' ' + command if command else ''}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- count ---------------------------------------------------------------------------------


def test_count_a_file_prints_exact_tokens_and_the_input_cost(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    text = "PagedAttention keeps the KV cache in blocks.\n" * 50 + ZH
    path.write_text(text, encoding="utf-8")
    assert main(["count", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    tokens = count_tokens(text, model="gpt-4o")
    assert out[0] == f"{tokens:,} tokens in {path} (gpt-4o)"
    cost = Pricing().cost("gpt-4o", tokens, 0)
    assert out[1] == f"input cost: {format_usd(cost)} (this text sent as input, at gpt-4o's price)"
    assert main(["count", str(path), "--model", "gpt-4", "-q"]) == 0
    assert capsys.readouterr().out == f"{count_tokens(text, model='gpt-4')}\n"


def test_count_chinese_from_stdin_in_a_subprocess():
    done = tokenguard("count", "-", stdin=ZH.encode())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "2 tokens in standard input (gpt-4o)"
    assert done.stdout.splitlines()[1].startswith("input cost: $0.0000")


def test_count_stdin_in_process_with_a_bom_and_an_encoding(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeff".encode() + ZH.encode())))
    assert main(["count", "-", "-q"]) == 0
    assert capsys.readouterr().out == "2\n"  # the byte-order mark is not text
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café".encode("latin-1"))))
    assert main(["count", "-", "--encoding", "latin-1", "-m", "o200k_base"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{count_tokens('café', model='o200k_base')} tokens in standard input (o200k_base)",
                   "input cost: unknown (no price is known for o200k_base)"]


@pytest.mark.parametrize(("args", "message"), [
    (["count", "{file}", "--model", "gpt-17-ultra"], "unknown tokenizer 'gpt-17-ultra'"),
    (["count", "{missing}"], "no such file: "),
    (["count", "{dir}"], "is a directory"),
    (["count", "{latin}"], "is not UTF-8 text (byte 3 does not decode); pass --encoding"),
    (["count", "{file}", "--encoding", "klingon"], "unknown encoding 'klingon'"),
])
def test_count_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "ok.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    names = {"file": tmp_path / "ok.txt", "missing": tmp_path / "nope.txt", "dir": tmp_path,
             "latin": tmp_path / "latin.txt"}
    assert main([arg.format(**names) for arg in args]) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err, "count") and captured.out == ""


# -- report --------------------------------------------------------------------------------


def test_report_table_by_user(ledger_path, capsys):
    assert main(["report", str(ledger_path), "--by", "user"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tokenguard usage by user"
    assert lines[2].split()[:3] == ["user", "calls", "input"]
    assert [line.split()[:2] for line in lines[4:6]] == [["ann", "2"], ["bob", "1"]]
    assert lines[7].split()[:2] == ["total", "3"]


def test_report_by_several_keys_and_time_bounds(ledger_path, capsys):
    assert main(["report", str(ledger_path), "--by", "user", "--by", "day", "--since", "2025-06-02",
                 "-f", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["user"], r["day"], r["calls"]) for r in rows] == [("bob", "2025-06-02", "1")]
    assert main(["report", str(ledger_path), "--by", "user,day", "--until", str(DAY1 + 1), "-f", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["user"], r["day"], r["calls"]) for r in data["rows"]] == [("ann", "2025-06-01", 1)]
    assert data["until"] == DAY1 + 1


def test_report_csv_json_html_files(ledger_path, tmp_path, capsys):
    expected = Ledger(ledger_path).report(by="model")
    assert main(["report", str(ledger_path), "-o", str(tmp_path / "r.csv")]) == 0  # the format from the suffix
    assert (tmp_path / "r.csv").read_text(encoding="utf-8") == expected.to_csv()
    assert main(["report", str(ledger_path), "--format", "json", "-o", str(tmp_path / "r.txt")]) == 0
    assert json.loads((tmp_path / "r.txt").read_text(encoding="utf-8"))["rows"] == expected.rows
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {tmp_path / 'r.txt'}: 1 rows, 3 calls"
    pytest.importorskip("matplotlib")
    assert main(["report", str(ledger_path), "--by", "user", "--format", "html", "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and ">ann</td>" in page


def test_report_in_a_subprocess(ledger_path):
    done = tokenguard("report", str(ledger_path), "--by", "user", "--format", "table")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[4].split()[:2] == ["ann", "2"]


@pytest.mark.parametrize(("args", "message"), [
    (["report", "{ledger}", "--by", "team"], "cannot report by 'team'; use one or more of: user, session"),
    (["report", "{ledger}", "--since", "yesterday"], "cannot read 'yesterday' as a time"),
    (["report", "{ledger}", "--format", "html"], "--format html writes a file: add -o FILE"),
    (["report", "{ledger}", "--format", "pdf"], "argument -f/--format: invalid choice: 'pdf'"),
    (["report", "{missing}"], "no ledger at "),
    (["report", "{dir}"], "is a directory, not a ledger file"),
    (["report", "{text}"], "is not a SQLite ledger (file is not a database)"),
    (["report", "{other}"], "is a SQLite file but not a tokenguard ledger (it has no 'calls' table)"),
    (["report", "{ledger}", "-o", "{dir}/no/such/dir/r.csv"], "cannot write "),
    (["report", "{ledger}", "--since", "1e15"], "a time must lie between the years 1 and 9999, got '1e15'"),
    (["report", "{ledger}", "--until=-1e20"], "a time must lie between the years 1 and 9999"),
    (["report", "{foreign}"], "has a 'calls' table, but not a tokenguard ledger's (no input_tokens, model, "),
    (["report", "{ledger}", "-o", "{ledger}"], "would overwrite the ledger's file"),
    (["report", "{ledger}", "-o", "{ledger}-wal"], "would overwrite the ledger's file"),
])
def test_report_errors_are_one_line_and_exit_2(ledger_path, tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_text("not a database " * 100, encoding="utf-8")
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:
        conn.execute("CREATE TABLE things (x)")
    with sqlite3.connect(tmp_path / "foreign.sqlite") as conn:
        conn.execute("CREATE TABLE calls (ts, caller, duration)")  # a phone log's
    names = {"ledger": ledger_path, "missing": tmp_path / "nope.sqlite", "dir": tmp_path,
             "text": tmp_path / "notes.txt", "other": tmp_path / "other.sqlite", "foreign": tmp_path / "foreign.sqlite"}
    assert main([arg.format(**names) for arg in args]) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err, "report") and captured.out == ""
    assert not (tmp_path / "nope.sqlite").exists()  # a missing ledger is not created
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:  # nor another file changed
        assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["things"]
    with sqlite3.connect(tmp_path / "foreign.sqlite") as conn:
        assert [row[1] for row in conn.execute("PRAGMA table_info(calls)")] == ["ts", "caller", "duration"]
    assert len(Ledger(ledger_path).records()) == 3  # and the ledger keeps every call


# -- the command line as a whole -----------------------------------------------------------


@pytest.mark.parametrize("command", [None, *(command.name for command in COMMANDS)])
def test_help_for_every_command(command, capsys):
    args = ["--help"] if command is None else [command, "--help"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tokenguard{'' if command is None else ' ' + command}")
    if command is None:
        assert all(c.name in out for c in COMMANDS)


def test_no_command_and_bad_options_are_one_line_errors(capsys):
    assert main([]) == 2
    assert one_error_line(capsys.readouterr().err, "") == (
        "tokenguard: error: choose a command: count, report, chat, demo, serve (see tokenguard --help)")
    assert main(["count"]) == 2
    assert "the following arguments are required: FILE" in one_error_line(capsys.readouterr().err, "count")
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_python_m_tokenguard_help_version_and_errors(tmp_path):
    done = tokenguard("--help")
    assert done.returncode == 0 and "count" in done.stdout and "report" in done.stdout
    assert tokenguard("--version").stdout.startswith("tokenguard ")
    failed = tokenguard("report", str(tmp_path / "nope.sqlite"))
    assert failed.returncode == 2 and failed.stdout == ""
    missing = tmp_path / "nope.sqlite"
    assert one_error_line(failed.stderr, "report") == f"tokenguard report: error: no ledger at {missing}"
    unknown = tokenguard("count", "-", "--model", "no-such-model", stdin=b"hi")
    assert unknown.returncode == 2 and "unknown tokenizer 'no-such-model'" in one_error_line(unknown.stderr, "count")


# -- chat and demo -------------------------------------------------------------------------

BUNDLED = "SmolLM2-135M-Instruct"


def test_chat_and_demo_help_describe_their_options(capsys):
    assert main(["chat", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in ("--model PATH", "--max-tokens N", "--session NAME", "--max-context-tokens N", "--ledger FILE",
                   "/new", "/quit"):
        assert option in out
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-progress" in out and "cache hit" in out and "budget refusal" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/no/such/model.gguf"], "no model at /no/such/model.gguf"),
    (["--max-tokens", "0"], "argument --max-tokens: expected a number >= 1, got 0"),
    (["--max-context-tokens", "many"], "argument --max-context-tokens: expected a whole number, got 'many'"),
])
def test_chat_mistakes_are_one_line_errors_before_any_model_loads(args, message, capsys):
    assert main(["chat", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err, "chat")


@pytest.mark.slow
def test_chat_reads_turns_from_stdin_and_meters_each_answer(tmp_path):
    question = "What is two plus two? Answer with a number."
    ledger = tmp_path / "chat.sqlite"
    stdin = f"{question}\n\n/new\n{question}\n/quit\nnever read\n".encode()
    done = tokenguard("chat", "--max-tokens", "12", "--session", "t1", "--ledger", str(ledger), stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    meters = [line for line in done.stdout.splitlines() if line.startswith("[in ")]
    assert len(meters) == 2, done.stdout
    first, again = meters
    exact = count_tokens([{"role": "user", "content": question}], model=BUNDLED)  # chat template included
    assert first.startswith(f"[in {exact} · out ")
    assert " · tail-only · cache miss · $0.000000 · " in first
    assert "(a new conversation: session 't1-2')" in done.stdout
    assert again.startswith("[in 0 · out 0 · tail-only · cache hit, saved ")  # /new: the same first turn
    # The new session's total starts afresh; the hit billed nothing.
    assert first.rsplit("· ", 1)[1] != again.rsplit("· ", 1)[1] == "session 0 tokens]"
    with Ledger(ledger) as written:
        rows = written.records()
    assert [(r["session"], r["cached"], r["input_tokens"]) for r in rows] == [("t1", 0, exact), ("t1-2", 1, 0)]
    report = tokenguard("report", str(ledger), "--by", "session")
    assert report.returncode == 0 and "t1" in report.stdout
