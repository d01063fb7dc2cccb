"""The package's shape: no import cycle between its modules, only cli.py prints, no module dominates the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ibbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """Every ibbench module that path imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from ibbench import results` imports ibbench.results; `from ibbench.x import y` imports ibbench.x
            # (or ibbench.x.y when that is a module).
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != "ibbench":
                found.add(name)
    return found - {module_name(path)}


def test_the_import_graph_has_no_cycle():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    assert graph["ibbench.sweep"] >= {"ibbench.config", "ibbench.results"}  # the scan sees real edges
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "closed"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_config_validates_without_the_sweep_machinery():
    assert not imported_modules(MODULES["ibbench.config"]) & {
        "ibbench.sweep", "ibbench.results", "ibbench.train", "ibbench.launch.local", "ibbench.launch.slurm"
    }  # fmt: skip


def test_only_the_cli_prints():
    offenders = []
    for name, path in MODULES.items():
        if name == "ibbench.cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno} print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [f"{name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] == "rich"]
    assert not offenders, offenders


def test_no_module_holds_more_than_an_eighth_of_the_package():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    total = sum(sizes.values())
    assert max(sizes.values()) <= total / 8, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
