"""The package layout holds: imports only go down the floors, never sideways between packages.

Every module under ``repro/`` is parsed with :mod:`ast` (nothing is imported), mapped to its package
(the first folder under ``repro/``) and that package's floor, and every ``repro`` import in it (at
module level or inside a function alike) is checked:

- it goes to the module's own package or to a lower floor;
- it does not go to another package on the same floor (``training`` and ``evaluate``; ``cluster``
  and ``results``);
- it names no ``_private`` name of another module;
- and ``argparse`` is imported only in ``repro/cli``;

and the import graph has no cycle, not even inside one package.

The floors are the package layout of the README's "Code layout" section.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repro"

FLOORS = {
    "utils": 0,
    "method": 1,
    "config": 2,
    "models": 3,
    "depth": 4,
    "data": 5,
    "training": 6, "evaluate": 6,
    "runs": 7,
    "cluster": 8, "results": 8,
    "cli": 9,
}
"""Package (first folder under ``repro/``) -> floor."""

TOP_MODULES = {
    "repro": -1,  # the package face: __version__ only
    "repro.__main__": 10,  # python -m repro
    "repro.jobs": 10,  # the legacy module path of queued job pickles (an alias of repro.cluster.jobs)
}
"""Modules at the top of ``repro/`` and their floors; any other top-level module is a layout error."""


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (``from X import name``: X, or X.name when that is a module)
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path``, relative ones resolved, ``from pkg import module`` as the module."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = tuple(alias.name for alias in node.names)
            submodules = [n for n in names if is_module(f"{base}.{n}")]
            if submodules:
                found += [Import(module, f"{base}.{n}", (), node.lineno) for n in submodules]
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                found.append(Import(module, base, rest, node.lineno))
    return found


def floor_of(dotted: str) -> tuple[str, int]:
    """(package, floor) of a ``repro`` module.

    Raises:
        KeyError: a module outside the layout.
    """
    if dotted in TOP_MODULES:
        return dotted, TOP_MODULES[dotted]
    package = dotted.split(".")[1]
    return package, FLOORS[package]


MODULES = sorted(PACKAGE.rglob("*.py"))



def test_every_module_has_a_floor():
    outside = [module_name(p) for p in MODULES if module_name(p) not in TOP_MODULES
               and module_name(p).split(".")[1] not in FLOORS]
    assert not outside, f"modules outside the layout (give them a package in FLOORS): {outside}"
    assert len(MODULES) > 80  # the walk saw the package


def violations() -> list[tuple[str, str, str]]:
    """(module, rule, message) of every import that breaks a rule."""
    found = []
    for path in MODULES:
        for imp in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{imp.line}"
            top = imp.target.split(".")[0]
            if top == "argparse" and not imp.module.startswith("repro.cli"):
                found.append((imp.module, "argparse outside repro/cli", f"{where}: argparse outside repro/cli"))
            if top != "repro":
                continue
            (package, floor), (target_package, target_floor) = floor_of(imp.module), floor_of(imp.target)
            if target_floor > floor:
                found.append((imp.module, "an upward import", f"{where}: {imp.module} (floor {floor}) imports "
                              f"{imp.target} (floor {target_floor}), an upward import"))
            elif target_floor == floor and target_package != package:
                found.append((imp.module, "same floor", f"{where}: {imp.module} imports {imp.target}, another package "
                              f"on floor {floor}"))
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private and imp.target != imp.module:
                found.append((imp.module, "private name", f"{where}: {imp.module} imports private {private} from "
                              f"{imp.target}"))
    return found


def test_imports_go_down_the_floors():
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(message for _, _, message in found)


def import_cycles(modules: list[Path]) -> list[list[str]]:
    """The strongly connected components (more than one module) of the import graph (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for path in modules:
        graph.setdefault(module_name(path), set()).update(
            imp.target for imp in imports_of(path) if imp.target.startswith("repro"))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    """Not even inside one package: a cycle hidden behind imports in function bodies is still a cycle."""
    cycles = import_cycles(MODULES)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_one(monkeypatch):
    a, b = PACKAGE / "runs" / "_probe_a.py", PACKAGE / "runs" / "_probe_b.py"
    texts = {a: "def f():\n    from repro.runs import _probe_b\n", b: "from repro.runs._probe_a import f\n"}
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *args, **kw: texts[self] if self in texts
                        else real_read(self, *args, **kw))
    monkeypatch.setattr(sys.modules[__name__], "is_module",
                        lambda dotted: dotted in ("repro.runs._probe_a", "repro.runs._probe_b"))
    assert import_cycles([a, b]) == [["repro.runs._probe_a", "repro.runs._probe_b"]]


@pytest.mark.parametrize("source, expected", [
    ("from repro.cli.main import main\n", "an upward import"),
    ("from repro.results.compare import render_results\n", "another package on floor 8"),
    ("from repro.cluster.launch import _submit_array\n", "imports private"),
    ("import argparse\n", "argparse outside repro/cli"),
    ("def f():\n    from repro.cli import main\n", "an upward import"),  # inside a function too
])
def test_the_check_catches_each_rule(tmp_path, monkeypatch, source, expected):
    """A module written into the cluster package with one bad import is reported for it."""
    probe = PACKAGE / "cluster" / "_layering_probe.py"
    monkeypatch.setattr(sys.modules[__name__], "MODULES", [probe])
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == probe else real_read(self, *a, **k))
    found = [message for _, _, message in violations()]
    assert len(found) == 1 and expected in found[0], found
