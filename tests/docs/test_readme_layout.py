"""The README's Layout section matches the tree: every subpackage and module is named, and nothing named is gone."""

import re

from conftest import REPO_ROOT

PACKAGES = ("encoder", "upcycle", "mllm_bridge")


def layout_block() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def package_sections() -> dict[str, str]:
    """Package name -> the layout lines under it (up to the next top-level entry)."""
    sections, current = {}, None
    for line in layout_block().splitlines():
        head = re.match(r"^(\S+)/", line)
        if head:
            current = head.group(1)
            sections[current] = ""
        if current is not None:
            sections[current] += line + "\n"
    return sections


def test_every_subpackage_and_module_is_in_the_layout():
    sections = package_sections()
    missing = []
    for package in PACKAGES:
        block = sections[package]
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            folder = path.parent.relative_to(REPO_ROOT / package)
            named = re.search(rf"(?<![\w]){re.escape(path.stem)}(\.py)?(?![\w])", block)
            # A module is listed by name, or a folder of helpers (tasks/ holds lmms-eval's task files) is named.
            helpers = [part for part in folder.parts if part == "tasks"]
            if not named and not (helpers and re.search(r"(?<![\w])tasks/", block)):
                missing.append(str(path.relative_to(REPO_ROOT)))
        for sub in sorted(p for p in (REPO_ROOT / package).iterdir() if (p / "__init__.py").is_file()):
            if not re.search(rf"(?<![\w]){re.escape(sub.name)}/", block):
                missing.append(f"{package}/{sub.name}/")
    assert not missing, f"README layout does not name: {missing}"


def test_every_file_the_layout_names_exists():
    names = set(re.findall(r"([\w]+\.(?:py|sh|json|pth))", layout_block()))
    files = {p.name for p in REPO_ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    assert names - files == set(), f"README layout names files that do not exist: {sorted(names - files)}"
