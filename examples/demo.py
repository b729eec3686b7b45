"""tokenguard demo: a scripted session on the bundled model - exact counts, context
fitting, a cache hit, a repetition stop, a budget refusal, a nested call and the cost
report. The same as `make demo` and `python -m tokenguard demo` (see tokenguard/demo.py).

    .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import sys

from tokenguard.demo import run

if __name__ == "__main__":
    sys.exit(run())
