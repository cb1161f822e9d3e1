"""The import structure: no cycles, `models/` and `losses/` stand alone, commands sit above the library.

Read from the source (every `import` / `from ... import` of loopfit, at module level or inside functions), so a
violation fails here whether or not a test happens to execute the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import loopfit

SRC = Path(loopfit.__file__).parent
# Modules that are commands or their front ends: the library below them never imports them.
COMMANDS = {"loopfit.cli", "loopfit.pipeline", "loopfit.sweep", "loopfit.__main__", "loopfit.lm_eval_model"}
STANDALONE = ("loopfit.models", "loopfit.losses")  # import nothing of loopfit outside themselves


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loopfit":
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]  # fmt: skip
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "loopfit"]
            for t in targets:
                if (r := resolve(t)) and r != mod:
                    graph[mod].add(r)
    return graph


def _within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(path[path.index(w) :] + [w] if w in path else [v, w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert cycles == []


def test_models_and_losses_import_nothing_else_of_loopfit():
    bad = [(m, t) for m, ts in _graph().items() for t in ts
           for pkg in STANDALONE if _within(m, pkg) and not _within(t, pkg)]  # fmt: skip
    assert bad == []


def test_the_library_never_imports_a_command():
    bad = [(m, t) for m, ts in _graph().items() if not any(_within(m, c) for c in COMMANDS) for t in ts
           if any(_within(t, c) for c in COMMANDS)]  # fmt: skip
    assert bad == []


def test_the_detector_sees_imports_inside_functions(tmp_path):
    """The graph includes function-level imports (the ones that hide cycles at import time)."""
    graph = _graph()
    assert "loopfit.models" in graph["loopfit.convert"]
    assert all(isinstance(v, set) for v in graph.values()) and len(graph) > 40
