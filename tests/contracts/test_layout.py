"""The package's architecture as contracts: imports point one way, down the levels, with no cycle.

The graph is read from the source (every import statement, including those inside functions and
under TYPE_CHECKING), with ``kernels/`` and ``bindings/`` at the import names setup.py gives them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"dicekern": "dicekern", "kernels": "dicekern.kernels", "bindings": "dicekern.bindings"}
# Level of each package; an import may go to its own package or to a strictly lower level.
LEVELS = {
    "dicekern.kernels": 0,
    "dicekern.core": 0,
    "dicekern.bindings": 1,
    "dicekern.curvature": 2,
    "dicekern.record": 3,
    "dicekern.engine": 4,
    "dicekern.zoo": 4,
    "dicekern.truth": 5,
    "dicekern.distributed": 6,
    "dicekern.apps": 7,
}
FACADE = {"dicekern", "dicekern.__main__", "dicekern.compat"}  # above every level: they re-export and alias


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the dicekern modules it imports (the longest existing module prefix of each name)."""
    found = modules()

    def resolve(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in found.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base for alias in node.names]
            else:
                continue
            targets |= {target for name in names if (target := resolve(name)) and target != module}
        graph[module] = targets
    return graph


def package_of(module: str) -> str | None:
    return next((p for p in sorted(LEVELS, key=len, reverse=True) if module == p or module.startswith(p + ".")), None)


def test_every_module_belongs_to_a_level_or_the_facade() -> None:
    loose = [m for m in modules() if m not in FACADE and package_of(m) is None]
    assert not loose, f"modules outside every subpackage: {loose}; put each in the package of its job"


def test_imports_point_down_the_levels() -> None:
    upward = []
    for module, targets in import_graph().items():
        if module in FACADE:
            continue
        here = package_of(module)
        for target in targets:
            there = package_of(target)
            if target in FACADE or (there != here and LEVELS[there] >= LEVELS[here]):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", sorted(p for p in LEVELS if p.startswith("dicekern.") and p.count(".") == 1))
def test_every_subpackage_says_what_it_owns_and_may_import(package: str) -> None:
    path = modules()[package]
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "May import" in docstring or "may import" in docstring, f"{path} must say what the package may import"


def test_the_core_never_imports_torch_distributed() -> None:
    offending = [m for m, path in modules().items()
                 if package_of(m) not in ("dicekern.distributed", "dicekern.apps") and m not in FACADE and "torch.distributed" in path.read_text()]
    assert not offending, f"torch.distributed outside dicekern.distributed: {offending}"
