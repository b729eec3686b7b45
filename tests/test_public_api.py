"""The public surface and the package's layering: what `import tokenguard` offers, and
that imports point down the layers (docs/architecture.md) without cycles."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path
from unittest import mock

import tokenguard as tg

PACKAGE = Path(tg.__file__).parent

# What each layer may import of tokenguard (itself always). The Guard and the
# decorator sit on top and may import everything below them.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_settings": {"errors"},  # checks of numeric options, for every layer that takes them
    "tokens": {"errors"},
    "runner": {"tokens", "errors"},
    "backends": {"runner", "tokens", "errors"},
    "stores": {"_settings", "errors"},
    "accounting": {"stores", "tokens", "_settings", "errors"},
    "context": {"stores", "tokens", "_settings", "errors"},
    "pipeline": {"accounting", "backends", "context", "stores", "tokens", "_settings", "errors"},
    "cache": {"accounting", "context", "pipeline", "stores", "_settings", "errors"},
    "_repetition": {"pipeline", "errors"},
    "telemetry": {"accounting", "pipeline", "errors"},
    "_guard": {"accounting", "backends", "context", "pipeline", "_repetition", "stores", "telemetry", "tokens",
               "_settings", "errors"},
    "_decorator": {"_guard", "accounting", "backends", "context", "pipeline", "stores", "tokens", "errors"},
    # The command line sits beside the decorator: it may drive a Guard (chat, demo).
    "cli": {"_guard", "_decorator", "_repetition", "accounting", "backends", "cache", "context", "demo", "pipeline",
            "serve", "stores", "tokens", "errors"},
    # The gateway sits beside the command line (which starts it): it drives a Guard too.
    "serve": {"_guard", "_decorator", "_repetition", "accounting", "backends", "cache", "context", "pipeline",
              "stores", "tokens", "errors"},
    # The demo is user code: it drives the public surface (import tokenguard as tg).
    "demo": {"tokenguard", "cache", "errors"},
    "__main__": {"cli"},
}


# Modules that load on first import only (the runner needs torch; the command line is
# and the demo are for `tokenguard ...`; the gateway needs starlette; telemetry loads
# with the first Guard); once
# some code imports them they are attributes of the package too, but not part of
# `import *`.
LAZY = {"runner", "cli", "demo", "serve", "telemetry"}


def test_the_public_surface_is_exactly_all():
    public = {name for name in vars(tg) if not name.startswith("_")} - LAZY
    assert sorted(public) == sorted(tg.__all__)
    modules = {name for name in tg.__all__ if isinstance(getattr(tg, name), types.ModuleType)}
    assert modules == {"accounting", "backends", "cache", "context", "errors", "pipeline", "stores", "tokens"}


def test_subpackages_declare_what_they_export():
    for name in ("accounting", "backends", "context", "pipeline", "stores", "tokens", "runner"):
        module = importlib.import_module(f"tokenguard.{name}")
        for exported in module.__all__:
            assert hasattr(module, exported), f"tokenguard.{name}.{exported}"


def test_the_decorator_does_not_shadow_a_module():
    assert isinstance(tg.guard, types.FunctionType)
    with mock.patch("tokenguard._guard.Guard") as patched:
        from tokenguard import _guard

        assert _guard.Guard is patched


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("tokenguard", *parts))] = path
    return found


def _imports(path: Path, module: str, *, runtime_only: bool) -> set[str]:
    """tokenguard modules that ``path`` imports: every import, or only those that run
    when the module is imported (top level, outside ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if runtime_only:
        nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "tokenguard" or name.startswith("tokenguard.")}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "tokenguard"


def test_imports_point_down_the_layers():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        layer = _layer(module)
        if layer in ("tokenguard",):
            continue
        for imported in _imports(path, module, runtime_only=False):
            if imported not in modules:
                continue  # a name imported from a module, not a module
            target = _layer(imported)
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {i for i in _imports(p, m, runtime_only=True) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else nxt)
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
