"""Layering of the project's own modules, from their source (every import, lazy ones inside functions too):
`utils` imports nothing above it, `models` may import `utils` but not the scripts or `classify`, and no
project modules import each other in a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "classify")
SCRIPTS = ("train", "val", "detect", "export", "hubconf")
# what each layer may import from the project (besides itself)
MAY_IMPORT = {"utils": {"utils"}, "models": {"utils", "models"}, "classify": {"utils", "models", "classify"}}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the packages and the top-level scripts under root."""
    mods = {p.stem: p for p in (root / f"{s}.py" for s in SCRIPTS) if p.is_file()}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).glob("*.py")):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module `name` imports anywhere in its source (module level or in a function)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import name` imports pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import models.yolo.x` -> the deepest project module it names
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = project_modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str:
    return name.split(".")[0] if name.split(".")[0] in PACKAGES else "scripts"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported' for every import a layer may not make."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                  if layer(a) in MAY_IMPORT and layer(b) not in MAY_IMPORT[layer(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted; [] when there is none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_utils_never_imports_models():
    graph = import_graph()
    assert "utils.checkpoints" in graph and "models.yolo" in graph  # the walk saw the project
    assert not [f"{a} -> {b}" for a, deps in graph.items() if a.startswith("utils") for b in deps
                if not b.startswith("utils")]


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The same walk on a small tree with the two faults planted, lazily inside functions."""
    for pkg in ("utils", "models"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "models" / "yolo.py").write_text("from utils.a import f\n")
    (tmp_path / "utils" / "a.py").write_text("def f():\n    from models.yolo import Detect\n    from . import b\n")
    (tmp_path / "utils" / "b.py").write_text("def g():\n    from utils import a\n")
    (tmp_path / "train.py").write_text("import models.yolo\nfrom utils.b import g\n")
    graph = import_graph(tmp_path)
    assert graph["train"] == {"models.yolo", "utils.b"}
    assert upward_imports(graph) == ["utils.a -> models.yolo"]
    assert cycles(graph) == [["models.yolo", "utils.a", "utils.b"]]
