"""mllm_bridge's modules depend on each other one way: no import circle, read from the source with `ast` (nothing
is imported, so the test takes milliseconds and needs neither torch nor LLaVA).

Every import statement counts, also one inside a function: a lazy import that closes a circle still ties the two
modules together (neither can be read, moved or tested without the other), it only hides the circle from Python.
An edge goes to the module an import names: `from .pkg import name` to `pkg.name` when that is a module, else to
`pkg`; the parent packages' `__init__` that Python runs on the way are not edges of their own.
"""

import ast

from conftest import REPO_ROOT

PACKAGE = "mllm_bridge"


def module_files() -> dict[str, object]:
    """Dotted module name -> file, for every module of the package (a package's `__init__` under its own name)."""
    modules = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path, modules) -> dict[str, int]:
    """{module of the package that an import statement in `path` names: line}, relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    edges = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            # `from .pkg import name`: the submodule when `name` is one, else the package itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != module:
                edges.setdefault(target, node.lineno)
    return edges


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {module of the package it imports: line of the import}."""
    files = module_files()
    return {module: imported_modules(module, path, files) for module, path in files.items()}


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_relative_and_lazy_imports():
    # the reader itself: a module-level relative import and one inside a function are both edges
    graph = import_graph()
    assert "mllm_bridge.llava.hook" in graph["mllm_bridge"]  # from .llava.hook import install_llava_hook
    assert "mllm_bridge.llava.checks" in graph["mllm_bridge.cli"]  # inside commands()


def test_circles_are_found():
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert circles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_circle_in_mllm_bridge():
    graph = import_graph()
    found = circles(graph)
    lines = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {b} (line {graph[a][b]})"
                                                  for a in c for b in c if b in graph[a])
             for c in found]
    assert not found, "import circles in mllm_bridge:\n" + "\n".join(lines)
