"""The shape the code base keeps: imports follow the flow, no import cycle, short functions, a thin trainer.

Run it as a script to print the figures (``python -m tests.unit.test_architecture``); the tests enforce them.
The flow (lower layers never import higher ones)::

    models  <-  dataset, jd  <-  evaluators  <-  training  <-  pretrain.py  <-  analysis

``evaluators`` is the library of metrics (ARC, exact match); evaluating or exporting a checkpoint from the
command line is ``analysis.evaluate`` / ``analysis.export`` (``evaluators.run`` / ``evaluators.export`` are
aliases that run them without importing them).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1] if (Path(__file__).resolve().parents[1] / "pretrain.py").exists() else Path(__file__).resolve().parents[2]


LAYERS = {"models": 0, "dataset": 1, "jd": 1, "evaluators": 2, "training": 3, "pretrain": 4, "analysis": 5}


MAX_FUNCTION_LINES = 60


MAX_TRAINER_LINES = 300


MAX_LOOP_LINES = 40  # Trainer.fit and Trainer.step: one screen each


def _modules() -> dict[str, Path]:
    files = [REPO / "pretrain.py"] + sorted(p for package in LAYERS if (REPO / package).is_dir() for p in (REPO / package).rglob("*.py"))
    return {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (at the top or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def edges_against_the_flow(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one (``jd.x -> training.y``)."""
    layer = lambda module: LAYERS[module.split(".")[0]]  # noqa: E731
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Pairs of packages that import each other."""
    packages = {(a.split(".")[0], b.split(".")[0]) for a, targets in graph.items() for b in targets if a.split(".")[0] != b.split(".")[0]}
    return sorted(f"{a} <-> {b}" for a, b in packages if (b, a) in packages and a < b)


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between modules (Tarjan's strongly connected components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_argument_parsing(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function that mostly declares command-line arguments (``parser.add_argument`` calls)."""
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    declared = sum(1 for call in calls if call.func.attr in ("add_argument", "add_mutually_exclusive_group", "add_argument_group"))  # type: ignore[union-attr]  # filtered to Attribute above
    return declared >= 8 and declared * 2 >= len(function.body)


def functions() -> Iterator[tuple[str, int, bool]]:
    """``(module.qualified_name, lines, is_argument_parsing)`` for every function of the project (tests excluded)."""
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        child.name = f"{node.name}.{child.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                yield f"{name}.{node.name}", node.end_lineno - node.lineno + 1, _is_argument_parsing(node)


def _long(limit: int) -> list[tuple[str, int]]:
    return sorted(((name, lines) for name, lines, parsing in functions() if lines > limit and not parsing), key=lambda item: -item[1])


def test_no_import_goes_against_the_flow() -> None:
    assert edges_against_the_flow(import_graph()) == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert package_cycles(graph) == []
    assert module_cycles(graph) == []


def test_no_function_is_longer_than_a_screen() -> None:
    assert _long(MAX_FUNCTION_LINES) == []


def test_the_trainer_only_wires() -> None:
    lines = (REPO / "training" / "trainer.py").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_TRAINER_LINES, f"training/trainer.py has {lines} lines"
    loops = {name: lines for name, lines, _ in functions() if name in ("training.trainer.Trainer.fit", "training.trainer.Trainer.step")}
    assert len(loops) == 2 and max(loops.values()) <= MAX_LOOP_LINES, loops


if __name__ == "__main__":
    graph = import_graph()
    trainer_lines = (REPO / "training" / "trainer.py").read_text(encoding="utf-8").count("\n")
    print(f"modules: {len(graph)}; import edges: {sum(map(len, graph.values()))}; training/trainer.py: {trainer_lines} lines")
    print(f"imports against the flow: {edges_against_the_flow(graph) or 'none'}")
    print(f"package cycles: {package_cycles(graph) or 'none'}; module cycles: {module_cycles(graph) or 'none'}")
    longest = sorted(((lines, name) for name, lines, parsing in functions() if not parsing), reverse=True)[:5]
    print("longest functions (argument parsing excluded): " + ", ".join(f"{name} {lines}" for lines, name in longest))
    print(f"over {MAX_FUNCTION_LINES} lines: {_long(MAX_FUNCTION_LINES) or 'none'}")
