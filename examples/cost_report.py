"""A cost report from a ledger, exported as CSV, JSON and one HTML page.

Every guarded call leaves one ledger row (tokens, cost, cache savings, latency, stop
reason; refusals and errors too). `ledger.report(by=...)` groups and sums those rows,
and the report exports itself: `to_csv`, `to_json` (rows, totals, the spend timeline,
savings by mechanism, notes) and `to_html` (the table with its chart embedded, one file).

    .venv/bin/python examples/cost_report.py                      # a sample ledger, reported by user and model
    .venv/bin/python examples/cost_report.py --ledger usage.sqlite --by user,day --out reports

Without `--ledger` it first records some sample traffic into an in-memory ledger: three
users on two models behind stand-in functions (no server, no cost), one answer served
from a cache, one prompt refused for being over the input cap. The files go to `--out`
(default: ./cost-report): usage.csv, usage.json and usage.html; the HTML chart needs
`pip install "tokenguard[reports]"` (pandas, matplotlib), and without it the HTML file
is skipped. `tokenguard report usage.sqlite --by user -o usage.html` does the same from
the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import tokenguard as tg
from tokenguard.cache import ExactCache


def stand_in_model(messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> str:
    """Your model call goes here."""
    return f"Here is what I found about {messages[-1]['content'].rstrip('?.').lower()}."


def record_sample_traffic(ledger: tg.Ledger) -> None:
    """Calls from three users on two models, all written to ``ledger``."""
    cache = ExactCache()  # a private cache in a temporary directory, removed by close()
    mini = tg.Guard(stand_in_model, model="gpt-4o-mini", ledger=ledger, cache=cache, max_input_tokens=500)
    large = tg.Guard(stand_in_model, model="gpt-4o", ledger=ledger)
    try:
        for question in ("What is PagedAttention?", "How does continuous batching work?", "What is a KV cache?"):
            mini.complete(question, user="alice", tags={"feature": "search"}, temperature=0)
        for question in ("Summarise this quarter's incidents.", "Draft the release notes."):
            large.complete(question, user="bob", tags={"feature": "writing"})
        for _ in range(2):  # the same question twice: the second answer comes from the cache
            mini.complete("What does tokenguard meter?", user="carol", tags={"feature": "search"}, temperature=0)
        with contextlib.suppress(tg.InputTooLong):  # refused before the model ran; the ledger still has its row
            mini.complete("Proofread this: " + "a very long document " * 200, user="carol", tags={"feature": "writing"})
    finally:
        cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", type=Path, help="a SQLite ledger file (default: record sample traffic first)")
    parser.add_argument("--by", default="user,model",
                        help=f"comma-separated group keys among: {', '.join(tg.accounting.REPORT_KEYS)} "
                             "(default: user,model)")
    parser.add_argument("--since", help="only calls from then on: an ISO date or date-time (UTC), or epoch seconds")
    parser.add_argument("--until", help="only calls before then")
    parser.add_argument("--out", type=Path, default=Path("cost-report"),
                        help="where the files go (default: ./cost-report)")
    args = parser.parse_args(argv)

    if args.ledger is not None and not args.ledger.is_file():
        parser.error(f"no ledger file at {args.ledger}")
    ledger = tg.Ledger(args.ledger)  # None: in memory
    if args.ledger is None:
        record_sample_traffic(ledger)
    try:
        report = ledger.report(by=args.by, since=args.since, until=args.until)
    except tg.InvalidRequest as error:
        parser.error(str(error))
    print(report.to_text().rstrip())
    print()

    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / "usage.csv", args.out / "usage.json"]
    report.to_csv(written[0])
    report.to_json(written[1])
    try:
        report.to_html(args.out / "usage.html")
        written.append(args.out / "usage.html")
    except tg.MissingDependency as missing:
        print(f"usage.html skipped: {missing}")
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
