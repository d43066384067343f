"""The package's import graph: no two modules import each other (directly or round a loop), counting imports
inside functions too, and the low layers never import the high ones (serve and cli above pipelines, above
samplers, models and text)."""
import ast
from pathlib import Path

import easel

ROOT = Path(easel.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _targets(name: str, path: Path, node: ast.AST, mods: dict) -> list[str]:
    """Modules of easel an import statement names (a `from pkg import mod` names the module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for t in names:
        while t not in mods and "." in t:
            t = t.rsplit(".", 1)[0]
        if t in mods and t not in (name, "easel"):
            out.append(t)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the easel modules it imports anywhere in its body}."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(name, path, node, mods))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_low_layers_never_import_high_ones():
    high = ("easel.serve", "easel.cli", "easel.pipelines", "easel.training", "easel.inspect")
    for name, targets in import_graph().items():
        if name.startswith(("easel.samplers", "easel.models", "easel.text")):
            assert not [t for t in targets if t.startswith(high)], name
