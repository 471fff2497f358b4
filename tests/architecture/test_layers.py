"""The shape of the code, checked from its source: no import cycle anywhere (function-local and
TYPE_CHECKING imports included), each layer imports only the layers below it, and the worker
runtime imports no Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ckpt", "tasks", "flows", "deployments")
# Lower first: a module may import its own layer and the ones before it. The command line is on top.
LAYERS = ("ckpt", "tasks.runtime", "tasks", "flows", "deployments", "flows.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that `name` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import tasks.runtime.stop` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unresolved(name: str, path: Path) -> list[str]:
    """Relative imports of `name` that name no module or package of ours (a module that moved)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            if module not in MODULES:
                out.append(module)
            elif not node.module:
                out += [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" not in MODULES]
    return out


def test_every_relative_import_names_a_module_that_exists():
    assert {n: u for n, p in MODULES.items() if (u := _unresolved(n, p))} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    best = -1
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            if best < 0 or len(prefix) > len(LAYERS[best]):
                best = rank
    return best


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_baton_is_part_of_an_import_cycle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_and_the_ones_below(module):
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert upward == [], f"{module} (layer {LAYERS[_layer(module)]}) imports {upward}"


def test_the_worker_runtime_imports_no_prefect_and_nothing_of_the_block_side():
    offenders = {}
    for name, path in MODULES.items():
        if not name.startswith("tasks.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [n for n in names if n.split(".")[0] in ("prefect", "prefect_ray")]
            if bad:
                offenders[name] = bad
    assert offenders == {}


def test_the_runtime_modules_are_the_ones_that_run_in_workers():
    # The Ray Train worker entry and everything it reaches live in tasks.runtime.
    reached, todo = set(), ["tasks.runtime.worker"]
    while todo:
        current = todo.pop()
        if current in reached:
            continue
        reached.add(current)
        todo.extend(GRAPH[current])
    assert {m for m in reached if m.startswith("tasks") and not m.startswith("tasks.runtime") and m != "tasks"} == set()
