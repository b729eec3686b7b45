"""The budget and ledger tests of tests/accounting, run again on other stores.

Those tests take a budget ``store`` (a path or ``None``) or a ``ledger`` object, so a
``redis://`` URL and a Redis ledger fit them unchanged; loading the module under a name
of its own keeps one copy of each test for every store.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def accounting_tests(name: str) -> ModuleType:
    """tests/accounting/<name>.py, loaded afresh under its own module name."""
    path = Path(__file__).resolve().parents[1] / "accounting" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_reused_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
