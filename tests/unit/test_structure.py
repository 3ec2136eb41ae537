"""The package's shape: imports point down the layers only, no module imports itself back
through others, kernels/ imports nothing from lens, and every file reads in one sitting."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# lowest first: a module may import its own layer's modules or lower ones, never higher
LAYERS = [
    ("kernels",),
    ("lens.errors", "lens.log", "lens.paths", "lens.stats", "lens.backend"),
    ("lens.data",),
    ("lens.models",),
    ("lens.runtime",),
    ("lens.metrics", "lens.training", "lens.baseline", "lens.options", "lens.trec"),
    ("lens.sweep", "lens.sweep_worker", "lens.ray_sweep", "lens.report", "lens.workbench"),
    ("lens.cli", "lens"),
    ("app",),
]
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module(p): p for folder in ("lens", "kernels", "app") for p in (ROOT / folder).rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[0]


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {m: _imports(p, set(sources)) - {m} for m, p in sources.items()}


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in deps
              if d != "lens" and _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_kernels_import_nothing_from_lens():
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("kernels")
           for d in deps if not d.startswith("kernels")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exports its modules: edges into a package are edges to its members
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep == "lens" or node.startswith(dep + ".") or dep.startswith(node + "."):
                continue  # a module and its own package
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("folder", ["lens", "kernels", "app"])
def test_files_read_in_one_sitting(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_checks_see_an_upward_import(tmp_path):
    """The walker finds imports inside functions and resolves `from package import module`."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from lens import sweep\n    import kernels.spec\n")
    assert _imports(path, {"lens", "lens.sweep", "kernels", "kernels.spec"}) == {"lens", "lens.sweep", "kernels.spec"}
    assert _layer("lens.sweep") > _layer("lens.runtime.runner") > _layer("kernels.spec")
