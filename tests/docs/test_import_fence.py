"""The dependency fence the README's Layout states, read from the source with `ast` (nothing is imported):
`upcycle -> encoder <- mllm_bridge`; in upcycle and mllm_bridge the product never reaches into the CPU demo
(`embedded/`) or, in upcycle, the research harness (`research/`), and the demo never into the research harness;
and no import circle inside any of the three packages.

Every import counts, at any depth (a function-level import is as real as a top-level one), type-only ones too.
The only product modules that may name the demo are command lines (`cli.py`, `__main__.py`): they wire it in as
the default a bare command runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGES = ("encoder", "upcycle", "mllm_bridge")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (`from .x import y` counts as both .x and .x.y, since y
    may be a submodule)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules_under(folder: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((REPO_ROOT / folder).rglob("*.py"))}


COMMAND_LINES = ("cli", "__main__")  # the wiring: a bare command runs the demo by default
FENCED = {"upcycle": ("embedded", "research"), "mllm_bridge": ("embedded",)}  # apart from the product
PRODUCT = {"upcycle": ("data", "eval", "recipes", "train"), "mllm_bridge": ("llava", "lmms", "train")}


def offending(folder: str, forbidden: tuple[str, ...], allow_command_lines: bool = False) -> list[str]:
    return [f"{module} imports {name}" for module, names in modules_under(folder).items() for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
            and not (allow_command_lines and module.rsplit(".", 1)[-1] in COMMAND_LINES)]


def test_every_subpackage_is_either_product_or_fenced():
    # A new folder has to take a side, so it cannot slip past the fence by being in neither list.
    for package in PRODUCT:
        folders = {p.name for p in (REPO_ROOT / package).iterdir() if (p / "__init__.py").is_file()}
        assert folders == {*PRODUCT[package], *FENCED[package]}, package


@pytest.mark.parametrize("folder", [f"upcycle/{f}" for f in PRODUCT["upcycle"]])
def test_the_product_part_of_upcycle_imports_neither_the_demo_nor_the_research_harness(folder):
    assert offending(folder, ("upcycle.embedded", "upcycle.research")) == []


def test_the_demo_does_not_import_the_research_harness():
    # research may build on the demo (replicate runs its steps, compare measures digit accuracy), not the reverse
    assert offending("upcycle/embedded", ("upcycle.research",)) == []


@pytest.mark.parametrize("folder", [f"mllm_bridge/{f}" for f in PRODUCT["mllm_bridge"]])
def test_the_product_part_of_mllm_bridge_reaches_the_demo_only_from_its_command_lines(folder):
    assert offending(folder, ("mllm_bridge.embedded",), allow_command_lines=True) == []


def test_the_fence_sees_a_crossing():
    # The checks above pass on an empty result; this one shows the same reader finds the crossings that exist
    # (research -> demo, a command line -> demo), and that only the command-line exemption lets the second pass.
    assert offending("upcycle/research", ("upcycle.embedded",)) != []
    assert offending("mllm_bridge/train", ("mllm_bridge.embedded",)) != []
    assert offending("mllm_bridge/train", ("mllm_bridge.embedded",), allow_command_lines=True) == []


def test_encoder_imports_neither_upcycle_nor_mllm_bridge():
    assert offending("encoder", ("upcycle", "mllm_bridge")) == []


def test_mllm_bridge_never_imports_upcycle():
    assert offending("mllm_bridge", ("upcycle",)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    # A circle ties its modules together (neither can be read, moved or tested alone), whether the import that
    # closes it is lazy or only for type checking: encoder/training's loop and sharded once were one.
    modules = modules_under(package)
    graph = {module: {name for name in names if name in modules and name != module}
             for module, names in modules.items()}
    circular = sorted(module for module in graph if any(module in reachable(graph, n) for n in graph[module]))
    assert circular == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_import_reader_resolves_relative_imports():
    # The fence is only as good as the reader: a relative import two levels up must resolve to its absolute name.
    path = REPO_ROOT / "upcycle" / "eval" / "commands.py"
    names = imports_of(path)
    assert "upcycle.data" in names and "encoder.loading" in names and "upcycle.eval.retrieval" in names


def test_the_import_reader_sees_imports_inside_functions():
    # Both of mllm_bridge's former circles closed through an import inside a function: those count as edges too.
    assert "mllm_bridge.llava.checks" in imports_of(REPO_ROOT / "mllm_bridge" / "cli.py")  # inside commands()
