"""The package layout is the pipeline: no module imports one that imports it back (directly or
through others), and no stage package imports a later one (``leadre.stages.LAYERS``). Both
are read from the code's own import statements, lazy ones inside functions included (only
``if TYPE_CHECKING:`` imports, which never run, are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import leadre
from leadre.stages import LAYERS, STAGES, layer_of

ROOT = Path(leadre.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for child in node.orelse for n in _runtime_nodes_of(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def _runtime_nodes_of(node: ast.AST):
    yield node
    yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """``{module: the leadre modules it imports}`` (``from pkg import name`` counts as an
    import of ``pkg.name`` where that is a module, else of ``pkg``)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_stage_imports_a_later_stage():
    backwards = [f"{m} -> {t}" for m, targets in sorted(import_graph().items())
                 for t in sorted(targets)
                 if layer_of(m) is not None and layer_of(t) is not None
                 and layer_of(t) > layer_of(m)]
    assert backwards == []


def test_every_stage_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYERS)


def test_the_checks_catch_a_cycle_and_a_backward_import():
    graph = {"leadre.a.x": {"leadre.a.y"}, "leadre.a.y": {"leadre.a.x"}, "leadre.a.z": set()}
    assert cycles(graph) == [["leadre.a.x", "leadre.a.y"]]
    assert layer_of("leadre.train.sft") > layer_of("leadre.model.decode") > layer_of("leadre.sids")
    assert layer_of("leadre.cli") is None and layer_of("leadre.config") is None
    code = ("if TYPE_CHECKING:\n    import typed_only\n"
            "def f():\n    import lazy\n")
    names = {a.name for n in _runtime_nodes(ast.parse(code)) if isinstance(n, ast.Import)
             for a in n.names}
    assert names == {"lazy"}  # lazy imports count, typing-only ones do not


def test_every_stage_config_lives_beside_its_stage():
    """A stage of package ``leadre.<pkg>`` is configured by a class in ``leadre.<pkg>.config``
    (the demo, a top-level module, keeps its own)."""
    for s in STAGES:
        module = s.config.split(":")[0]
        if layer_of(s.module) is not None:
            assert module == f"leadre.{s.module.split('.')[1]}.config", s.name
