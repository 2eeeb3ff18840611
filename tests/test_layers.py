"""The package's layers import one way (DESIGN.md): model <- tasks <- pipeline <- commands <- cli.

`io`, `errors` and `machine` sit under everything; `export` uses `model`. A module that needs to import
upward is in the wrong room, and inside `model/` no module may need another one that needs it back, not
even through an import tucked inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gptforge

SRC = Path(gptforge.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["gptforge", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The longest known module that `name` (a module or a name inside one) refers to."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported gptforge module, line, at module level) for every import in `module`, nested ones too."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level still run at import
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "gptforge" or name.startswith("gptforge."):
                out.append((_resolve(name), node.lineno, id(node) in top))
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> str:
    """'model', 'tasks', 'pipeline', 'commands', 'export', 'serve', or a top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gptforge"


# Layer -> layers it must never import (directly, at any depth in the file).
FORBIDDEN = {
    "model": {"tasks", "pipeline", "commands", "cli", "serve", "export"},
    "export": {"tasks", "pipeline", "commands", "cli", "serve"},
    "tasks": {"pipeline", "commands", "cli", "serve", "export"},
    "pipeline": {"commands", "cli"},
    "serve": {"commands", "cli"},
}
BOTTOM = {"io", "errors", "machine"}  # import nothing from gptforge but each other


def test_the_walk_sees_the_package():
    assert {"gptforge.model.gpt", "gptforge.model.checkpoint", "gptforge.io", "gptforge.cli"} <= set(MODULES)
    # imports are seen at module level and inside functions, and relative to the package
    assert ("gptforge.model.gpt", True) in {(m, t) for m, _, t in IMPORTS["gptforge.pipeline.trainer"]}
    assert ("gptforge.pipeline.train", False) in {(m, t) for m, _, t in IMPORTS["gptforge.pipeline.runner"]}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    bad = [
        f"{m}:{line} imports {target}"
        for m, imports in IMPORTS.items()
        if _layer(m) == layer
        for target, line, _ in imports
        if _layer(target) in FORBIDDEN[layer]
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_nothing_imports_the_commands_or_the_cli():
    bad = [
        f"{m}:{line} imports {target}"
        for m, imports in IMPORTS.items()
        if _layer(m) not in ("commands", "cli")
        for target, line, _ in imports
        if _layer(target) in ("commands", "cli")
    ]
    assert not bad, "\n".join(bad)


def test_bottom_modules_import_only_each_other():
    bottom = {f"gptforge.{b}" for b in BOTTOM} & set(MODULES)
    assert {"gptforge.io", "gptforge.errors"} <= bottom
    bad = [
        f"{m}:{line} imports {target}"
        for m in sorted(bottom)
        for target, line, _ in IMPORTS[m]
        if target not in bottom
    ]
    assert not bad, "\n".join(bad)


def _cycles(modules: set[str]) -> list[list[str]]:
    """Every import cycle among `modules`, counting imports inside functions (each cycle once)."""
    graph = {m: sorted({t for t, _, _ in IMPORTS[m] if t in modules and t != m}) for m in modules}
    found: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for m in sorted(modules):
        walk([m])
    return [list(c) for c in sorted(found)]


def test_cycle_finder_finds_a_cycle_through_a_function_level_import():
    saved = dict(IMPORTS)
    try:
        IMPORTS["gptforge.model.gpt"] = [*saved["gptforge.model.gpt"], ("gptforge.model.lora", 1, False)]
        assert ["gptforge.model.gpt", "gptforge.model.lora"] in _cycles(
            {m for m in MODULES if m.startswith("gptforge.model.")}
        )
    finally:
        IMPORTS.clear()
        IMPORTS.update(saved)


def test_no_import_cycle_inside_the_model_layer():
    cycles = _cycles({m for m in MODULES if m.startswith("gptforge.model.")})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def _reachable(start: set[str]) -> set[str]:
    """Every gptforge module that importing `start` can import, through any depth (function-level too)."""
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m in seen or m not in IMPORTS:
            continue
        seen.add(m)
        todo += [t for t, _, _ in IMPORTS[m]]
    return seen


def test_serve_uses_only_the_judge_free_parts_of_pipeline():
    """The server sits beside the pipeline: it may use model/, tasks/, export/ and evaluation's inference,
    never the judge (which would call a server), the trainer or the stage runner."""
    serve = {m for m in MODULES if _layer(m) == "serve"}
    assert "gptforge.serve.engine" in serve and "gptforge.serve.app" in serve
    reach = _reachable(serve)
    banned = {"gptforge.pipeline.judge", "gptforge.pipeline.trainer", "gptforge.pipeline.runner"}
    assert not reach & banned, sorted(reach & banned)
    assert "gptforge.serve.app" not in _reachable({"gptforge.serve.engine"})  # the engine knows no HTTP
