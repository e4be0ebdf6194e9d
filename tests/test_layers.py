"""The package's import structure: no import cycle, and each layer imports only those below it.

Layers, bottom up: `core` and the helpers it shares; `tasks` (samplers, with their data I/O in
`tasks.data`); `nn` and `learners`; `outer` (the pure loops, their registry and the host
driver); the experiment layer (config, discovery, training, reload, compare, cli); the
experiments. Checked on the source (ast), so a new module joins without registration.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name, as pyproject's package-dir maps them
PACKAGES = {"metalearn": "metalearn", "tasks": "metalearn.tasks", "outer": "metalearn.outer",
            "experiments": "metalearn.experiments"}
# modules of the experiment layer: nothing below them may import them
EXPERIMENT_LAYER = {f"metalearn.{m}" for m in (
    "experiment", "config", "discovery", "training", "reload", "compare", "cli")}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path], top_level: bool) -> set[str]:
    """The package modules `path` imports (only at module level when `top_level`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule; `from pkg import name`, the package
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph(top_level: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules, top_level) - {m} for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, the first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_at_module_level():
    """A module-level import cycle makes the import order matter; none may exist (a package's
    `__init__` importing its own submodules is not a cycle)."""
    graph = _graph(top_level=True)
    for m, deps in graph.items():  # a submodule importing its package's names is fine
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _layer(m: str) -> int:
    if m.startswith("metalearn.experiments"):
        return 5
    if m in EXPERIMENT_LAYER or m == "metalearn":
        return 4
    if m.startswith("metalearn.outer"):
        return 3
    if m.startswith(("metalearn.learners", "metalearn.nn", "metalearn.cpu_ops")):
        return 2
    if m.startswith("metalearn.tasks"):
        return 1
    return 0  # core and the helpers it shares (messages, checkpoint, runs, evaluation, ...)


def _finds_experiments(m: str, d: str) -> bool:
    """Discovery imports the (empty) experiments package to find the experiments in it."""
    return m == "metalearn.discovery" and d == "metalearn.experiments"


def test_each_layer_imports_only_the_layers_below():
    """Even inside functions: the outer loops do not reach into the experiment layer, the
    samplers not into the learners, and so on (the package `__init__`, the top, is exempt)."""
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in _graph(top_level=False).items() for d in sorted(deps)
           if m != "metalearn" and _layer(d) > _layer(m) and not _finds_experiments(m, d)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["metalearn.outer.driver", "metalearn.tasks.data.omniglot",
                                    "metalearn.learners.hypertransformer", "metalearn.cli"])
def test_a_module_imports_alone_in_a_fresh_interpreter(module):
    """Imported first, in a new interpreter, each of these loads (no order dependence)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
