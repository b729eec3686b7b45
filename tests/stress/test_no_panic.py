"""tiktoken's regex engine panics (a Rust backtrace on stderr) on whitespace runs of
about a million characters. tokenguard must never hand it one: counting and encoding
such text is exact and silent. Run in a subprocess, whose stderr is the evidence."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import tokenguard as tg

    cases = [
        ("gpt-4o", " " * 1_000_000 + "x"),
        ("gpt-4o", "\\n" + " \\t" * 500_001 + "word"),
        ("gpt-4", "\\t" * 1_100_000 + "x"),
    ]
    for name, text in cases:
        tokenizer = tg.get_tokenizer(name)
        ids = tokenizer.encode(text)
        assert tokenizer.count(text) == len(ids), name
        assert tokenizer.decode(ids) == text, name
        assert tokenizer.count_until(text, 4000) > 4000, name
    o200k = tg.get_tokenizer("o200k_base")
    text = " " * 1_000_000 + "x"
    assert o200k.encode(text) == o200k._encode_piecewise(text)  # the regex-module reference
    assert tg.count_tokens(" " * 1_000_000, model="gpt-4o") == 7813
    print("silent ok")
    """
)


def test_a_million_spaces_leave_stderr_clean() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "silent ok" in result.stdout
    assert "panicked" not in result.stderr
    assert "backtrace" not in result.stderr.lower()
