"""The tree's one rule, read off the source: imports point one way down a chain of layers, and nothing imports in a
circle. Every import counts, those inside functions too.

    errors <- kernels <- core <- data <- peft <- models <- tasks <- train <- infer <- analysis <- cli

A module may import its own layer and the layers before it; `tinygraft/__init__.py` and `__main__.py` (the
package's face) may import anything. Kernels import nothing of tinygraft but errors and each other, so they can be
lifted out whole.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinygraft"
ORDER = ["errors", "kernels", "core", "data", "peft", "models", "tasks", "train", "infer", "analysis", "cli"]
FACES = {"tinygraft", "tinygraft.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The tinygraft modules `path` imports, anywhere in it (a name imported from a package counts as its module
    when it is one, else as the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("tinygraft") and t != name:
                found.add(t)
    return found


def layer(name: str) -> int | None:
    parts = name.split(".")
    return ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in ORDER else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def test_every_import_points_down_the_chain():
    wrong = []
    for m, deps in graph().items():
        if m in FACES:
            continue
        own = layer(m)
        assert own is not None, f"{m} is in no layer of {ORDER}"
        for d in deps:
            if d == "tinygraft" or layer(d) is None or layer(d) > own:
                wrong.append(f"{m} -> {d}")
    assert not wrong, "imports against the layer order: " + ", ".join(sorted(wrong))


def test_kernels_import_only_errors_and_kernels():
    for m, deps in graph().items():
        if layer(m) == ORDER.index("kernels"):
            assert all(layer(d) in (0, 1) for d in deps), f"{m} imports {sorted(deps)}"


def test_no_import_cycles():
    edges = {m: {d for d in deps if d not in FACES} for m, deps in graph().items()}
    # a package's __init__ imports its own modules (its face); a cycle through one is a cycle all the same, except
    # the __init__ -> module edge itself, which every package has
    for m in list(edges):
        edges[m] = {d for d in edges[m] if not (d.startswith(m + ".") and modules()[m].name == "__init__.py")}
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    f = tmp_path / "tinygraft" / "core" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text("def f():\n    from tinygraft.train import loop\n    from . import layers\n")
    known = {"tinygraft.train.loop": None, "tinygraft.core.layers": None, "tinygraft.core.x": f}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "tinygraft"
    try:
        assert imports(f, known) == {"tinygraft.train.loop", "tinygraft.core.layers"}
    finally:
        PACKAGE = saved


def test_every_folder_is_a_package():
    """setuptools' find_packages ships only folders with an __init__.py: one without would be left out of a wheel."""
    folders = [d for d in PACKAGE.rglob("*") if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))]
    assert all((d / "__init__.py").is_file() for d in [PACKAGE, *folders]), [str(d) for d in folders]
