"""The package's import graph, read from the source with `ast`, has no cycle.

How the graph is built:

- Nodes are the modules of `keras_microtune/` (a package's `__init__.py` is the
  package's own node, e.g. `keras_microtune.optimize`).
- Every `import` / `from ... import` counts, at module level and inside
  functions, classes, `if` and `try` blocks alike: a function-local import
  that only dodges a circle is still a circle.
- `import a.b.c` is an edge to `a.b.c`; `from a.b import c` is an edge to the
  module `a.b.c` when there is one, else to `a.b`; relative imports are
  resolved against the importing module. As at run time, importing `a.b.c`
  also runs the `__init__` of `a.b`, so that is an edge too, and a package's
  `__init__` has edges to the modules it imports.

How a package's own `__init__` is treated (the one exception):

- An edge from a module to the `__init__` of a package that contains it
  (`import keras_microtune as kmt` inside `keras_microtune/callbacks/`, or
  `from keras_microtune.optimize import strip` inside `optimize/`) is not a
  cycle-maker: Python has started initialising every ancestor package before
  the module runs, so the import binds the package object and runs nothing
  new. It is replaced by an edge to the module that defines the imported
  name, when the `__init__` re-exports it from a child (or lists it in the
  top-level `_LAZY` table), since that module is what the importer needs.
  This holds while those `__init__` files do nothing but re-export (imports,
  constants, `__all__`, a lazy module `__getattr__`/`__dir__`), which
  `test_package_inits_only_reexport` checks.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "keras_microtune"


def _modules():
    """`{module name: path}` for every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_package(name, modules):
    return modules[name].name == "__init__.py"


def _parse(name, modules):
    return ast.parse(modules[name].read_text(), str(modules[name]))


def _absolute(node, importer, modules):
    """The absolute module name an `ImportFrom` node names."""
    if not node.level:
        return node.module
    base = importer if _is_package(importer, modules) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(importer, modules):
    """`[(module, name or None, line)]` for every import in `importer`."""
    found = []
    for node in ast.walk(_parse(importer, modules)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, importer, modules)
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def _known(name, modules):
    """The package module `name` is, or is an attribute of."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _reexported(package, name, modules):
    """The module `package/__init__.py` takes `name` from, or None."""
    for source, imported, _ in _imports(package, modules):
        if imported == name and source.startswith(f"{package}."):
            return _known(
                f"{source}.{name}" if f"{source}.{name}" in modules else source, modules
            )
    for node in _parse(package, modules).body:  # The top-level `_LAZY` table.
        if isinstance(node, ast.Assign) and ast.unparse(node.targets) == "_LAZY":
            lazy = ast.literal_eval(node.value)
            if name in lazy:
                return _known(lazy[name][0], modules)
    return None


def _edges(importer, source, name, modules):
    """The modules one imported name makes `importer` depend on."""
    if name is not None and f"{source}.{name}" in modules:
        source, name = f"{source}.{name}", None
    target = _known(source, modules)
    if importer.startswith(f"{target}.") and name is not None:
        target = _reexported(target, name, modules) or target
    parts = target.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [m for m in prefixes if m != importer and not importer.startswith(f"{m}.")]


def _graph():
    """`{importer: {imported: first line}}` over the package's modules."""
    modules = _modules()
    graph = {}
    for importer in modules:
        edges = graph.setdefault(importer, {})
        for source, name, line in _imports(importer, modules):
            if source != PACKAGE and not source.startswith(f"{PACKAGE}."):
                continue
            for target in _edges(importer, source, name, modules):
                edges.setdefault(target, line)
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def _describe(component, graph):
    members = set(component)
    lines = [
        f"  {a} -> {b} (line {graph[a][b]})"
        for a in component
        for b in sorted(graph[a])
        if b in members
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_no_import_cycle():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_graph_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    files = {
        "__init__.py": "from keras_microtune.sub import b\n",
        "other.py": "from keras_microtune.sub import f\n",
        "sub/__init__.py": "from keras_microtune.sub.b import f\n",
        "sub/a.py": "import keras_microtune\n\ndef g():\n    from . import b\n",
        "sub/b.py": "def f():\n    from keras_microtune.other import h\n",
        "sub/c.py": "from keras_microtune.sub import f\n",
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = _graph()
    sub = f"{PACKAGE}.sub"
    # a -> b is relative and function-local; a -> keras_microtune is an edge
    # to an ancestor package, ignored; c -> b looks through its own package's
    # __init__; `other` is outside `sub`, so it runs sub/__init__.
    assert graph[f"{sub}.a"] == {f"{sub}.b": 4}
    assert graph[f"{sub}.c"] == {f"{sub}.b": 1}
    assert graph[f"{PACKAGE}.other"] == {sub: 1}
    assert graph[sub] == {f"{sub}.b": 1}
    assert graph[PACKAGE] == {sub: 1, f"{sub}.b": 1}
    assert _cycles(graph) == [[f"{PACKAGE}.other", sub, f"{sub}.b"]]


@pytest.mark.parametrize(
    "name", [m for m, p in _modules().items() if p.name == "__init__.py"]
)
def test_package_inits_only_reexport(name):
    """What lets the graph ignore edges to ancestor `__init__` files."""
    tree = ast.parse(_modules()[name].read_text())
    allowed = (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.Expr)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert node.name in ("__getattr__", "__dir__"), (name, node.name)
        else:
            assert isinstance(node, allowed), (name, ast.dump(node)[:80])
