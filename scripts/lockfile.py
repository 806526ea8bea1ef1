"""requirements.lock: write it from a green environment, check it fits an interpreter and pyproject, check an
installed environment, compare an environment to it.

Standard library only: scripts/setup.sh runs this with the system Python before any environment exists.

    python scripts/lockfile.py write     --python VENV/bin/python [--lock requirements.lock]
    python scripts/lockfile.py check     --python PYTHON          [--lock requirements.lock]
    python scripts/lockfile.py pip-check --python VENV/bin/python
    python scripts/lockfile.py diff      --python VENV/bin/python [--lock requirements.lock]
    python scripts/lockfile.py why-setup-failed --python PYTHON LOG   (scripts/check_latest.sh)

The lock pins every installed distribution except the project itself and pip (pip freeze --all
--exclude-editable), with a header naming the Python (major.minor) and machine it was made on; setup.sh installs
it with `pip install --no-deps -r`, so what is installed is exactly what the suite passed with. Because nothing
is resolved then, `check` first makes sure the lock pins every requirement of pyproject.toml (with the extras the
set-up installs) within its range, and `pip-check` makes sure the installed environment is consistent before
setup.sh calls it done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: read the two lists setup.sh needs by hand (`_requirement_lists`)
    tomllib = None

DEFAULT_LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
PYPROJECT = DEFAULT_LOCK.with_name("pyproject.toml")
PROJECT = "clip-moe-toolkit"
# What setup.sh installs besides pyproject's dependencies: these extras, and NO_DEPS without their dependencies.
SETUP_EXTRAS = ("dev", "mllm", "deepspeed")
# llava-torch pins torch==2.0.1, transformers==4.36.2, ... and a web UI (gradio, fastapi, ...). Only its modeling
# code is used, and it works with the versions pyproject asks for, so it is installed without its dependencies.
NO_DEPS = ("llava-torch", "shortuuid")
# What the README names as "tested with" (the stack a user cares about), in this order.
HEADLINE = ("torch", "torchvision", "transformers", "accelerate", "open-clip-torch", "lmms-eval", "llava-torch",
            "filelock")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


class LockError(Exception):
    """A problem with the lock or the interpreter, said in one line."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def interpreter_facts(python: str) -> dict[str, str]:
    code = "import json, platform, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], " \
           "'machine': platform.machine(), 'system': platform.system().lower()}))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise LockError(f"cannot run {python}: {err}; set CLIP_MOE_PYTHON to a Python 3.10+ interpreter") from None
    return json.loads(out)


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(header fields, {canonical name: version}) of a lock file."""
    if not path.is_file():
        raise LockError(f"{path} is missing; restore it from git or write one with scripts/lock.sh")
    header, pins = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() in ("python", "machine", "system", "date"):
                header[key.strip()] = value.strip()
            continue
        match = _PIN.match(line)
        if not match:
            raise LockError(f"{path}:{number}: {line!r} is not NAME==VERSION; rewrite the lock with scripts/lock.sh")
        pins[canonical(match.group(1))] = match.group(2)
    if "python" not in header:
        raise LockError(f"{path} has no '# python: X.Y' header; rewrite it with scripts/lock.sh")
    return header, pins


def installed(python: str) -> dict[str, str]:
    """{canonical name: version} of what an interpreter's environment holds (the project and pip excluded)."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    skip = {canonical(PROJECT), "pip"}
    return {canonical(p["name"]): p["version"] for p in json.loads(out) if canonical(p["name"]) not in skip}


def check(python: str, lock: Path, pyproject: Path = PYPROJECT) -> None:
    """Raise LockError when the lock was made for another Python or machine than `python`, or does not pin what
    pyproject requires (`require_pinned`)."""
    header, pins = read_lock(lock)
    require_pinned(pins, setup_requirements(pyproject), lock)
    facts = interpreter_facts(python)
    if header["python"] != facts["python"]:
        raise LockError(f"{lock.name} was made with Python {header['python']}, but {python} is Python "
                        f"{facts['python']}; set CLIP_MOE_PYTHON=python{header['python']}, or resolve from "
                        "pyproject's ranges instead with CLIP_MOE_UNLOCKED=1")
    for key in ("machine", "system"):
        if header.get(key) and header[key] != facts[key]:
            raise LockError(f"{lock.name} was made on {header.get('system')}-{header.get('machine')}, this is "
                            f"{facts['system']}-{facts['machine']}; resolve from pyproject's ranges with "
                            "CLIP_MOE_UNLOCKED=1 (or write a lock for this machine with scripts/lock.sh)")


def write(python: str, lock: Path) -> None:
    """Freeze `python`'s environment into `lock`, atomically. With setuptools (torch requires a recent one, and a
    new environment starts with the Python's bundled one), without pip (the environment's own is used)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    pins = sorted((line for line in out.splitlines() if _PIN.match(line) and canonical(line.split("==")[0]) != "pip"),
                  key=lambda l: canonical(l.split("==")[0]))
    unpinned = [line for line in out.splitlines() if line.strip() and not _PIN.match(line) and not line.startswith("#")]
    if unpinned:
        raise LockError(f"cannot pin {unpinned[0]!r} (installed from a path or URL); install it from the index")
    # The lock setup.sh would refuse is not written either (an environment that lacks a requirement).
    require_pinned({canonical(line.split("==")[0]): line.split("==")[1] for line in pins},
                   setup_requirements(PYPROJECT), lock)
    facts = interpreter_facts(python)
    text = "\n".join([
        "# The exact versions the test suite passed with: written by scripts/lock.sh, installed by scripts/setup.sh",
        "# (pip install --no-deps -r requirements.lock, then the project itself). Do not edit by hand.",
        f"# python: {facts['python']}",
        f"# system: {facts['system']}",
        f"# machine: {facts['machine']}",
        f"# date: {datetime.date.today().isoformat()}",
        *pins, ""])
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f".{lock.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, lock)
    print(f"wrote {lock} ({len(pins)} packages, Python {facts['python']}, {facts['system']}-{facts['machine']})")


# -- what pyproject requires, and whether the lock pins it --------------------------------------------------------

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?$")
_SPECIFIER = re.compile(r"^\s*(===|==|!=|~=|<=|>=|<|>)\s*([^\s,]+)\s*$")
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d*))?"
                      r"(?:[-_.]?(?:post|rev|r)[-_.]?(\d*))?(?:[-_.]?dev[-_.]?(\d*))?(?:\+[a-z0-9.]+)?$", re.I)


def setup_requirements(pyproject: Path) -> list[str]:
    """Every requirement setup.sh installs: pyproject's dependencies, its SETUP_EXTRAS, and NO_DEPS."""
    if not pyproject.is_file():
        raise LockError(f"{pyproject} is missing; restore it from git")
    dependencies, optional = _requirement_lists(pyproject.read_text())
    unknown = [extra for extra in SETUP_EXTRAS if extra not in optional]
    if unknown:
        raise LockError(f"{pyproject} has no optional dependencies {', '.join(unknown)}, which setup.sh installs; "
                        "restore them or update SETUP_EXTRAS in scripts/lockfile.py")
    return [*dependencies, *(req for extra in SETUP_EXTRAS for req in optional[extra]), *NO_DEPS]


def _requirement_lists(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """([project] dependencies, {extra: requirements}) of pyproject.toml's text."""
    if tomllib is not None:
        project = tomllib.loads(text).get("project", {})
        return list(project.get("dependencies", [])), dict(project.get("optional-dependencies", {}))
    # Python 3.10: the arrays of strings under [project] and [project.optional-dependencies], comments dropped.
    dependencies, optional = [], {}
    for key, items, where in _arrays(text):
        if where == "project" and key == "dependencies":
            dependencies = items
        elif where == "project.optional-dependencies":
            optional[key] = items
    return dependencies, optional


def _arrays(text: str):
    """(key, [strings], table) of every `key = [ "..." ]` array in `text` (a TOML subset: what pyproject uses)."""
    table, key, items = "", None, []
    for raw in text.splitlines():
        line = re.sub(r"\s+#.*$|^\s*#.*$", "", raw).strip()
        if key is None:
            header = re.match(r"^\[([^\]]+)\]$", line)
            if header:
                table = header.group(1).strip()
                continue
            start = re.match(r'^"?([A-Za-z0-9_.-]+)"?\s*=\s*\[(.*)$', line)
            if not start:
                continue
            key, line, items = start.group(1), start.group(2), []
        items += re.findall(r'"([^"]*)"', line)
        if "]" in line:
            yield key, items, table
            key = None


def parse_requirement(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(canonical name, [(operator, version), ...]) of a requirement such as 'transformers>=5,<5.40'."""
    match = _REQUIREMENT.match(text)
    if not match:
        raise LockError(f"pyproject.toml requirement {text!r} cannot be read; write it as NAME>=VERSION,...")
    specs = []
    for part in filter(None, (p.strip() for p in match.group(2).strip("()").split(","))):
        spec = _SPECIFIER.match(part)
        if not spec:
            raise LockError(f"pyproject.toml requirement {text!r}: {part!r} is not OPERATOR VERSION")
        specs.append((spec.group(1), spec.group(2)))
    return canonical(match.group(1)), specs


def version_key(version: str) -> tuple:
    """A sort key of a PEP 440 version: 1.0.dev1 < 1.0a1 < 1.0rc1 < 1.0 < 1.0.post1 (local labels ignored)."""
    match = _VERSION.match(version.strip())
    if not match:
        raise LockError(f"{version!r} is not a version number; rewrite the lock with scripts/lock.sh")
    release, pre, pre_n, post, dev = match.groups()
    numbers = [int(n) for n in release.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    stage = {"a": 0, "alpha": 0, "b": 1, "beta": 1}.get((pre or "").lower(), 2)
    pre_key = (stage, int(pre_n or 0)) if pre else ((-1, 0) if dev is not None and post is None else (3, 0))
    return (tuple(numbers), pre_key, -1 if post is None else int(post or 0), float("inf") if dev is None
            else int(dev or 0))


def satisfies(version: str, specs: list[tuple[str, str]]) -> bool:
    """Whether `version` meets every (operator, version) of `specs` (wildcards `==X.*` compare the prefix)."""
    have = version_key(version)
    for op, wanted in specs:
        if wanted.endswith(".*"):
            prefix = [int(n) for n in wanted[:-2].split(".")]
            same = list(have[0][:len(prefix)]) + [0] * max(0, len(prefix) - len(have[0])) == prefix
            ok = same if op == "==" else not same
        elif op == "~=":
            base = [int(n) for n in re.match(r"[\d.]+", wanted).group().rstrip(".").split(".")][:-1]
            ok = have >= version_key(wanted) and list(have[0][:len(base)]) == base
        else:
            other = version_key(wanted)
            ok = {"==": have == other, "===": version == wanted, "!=": have != other, "<": have < other,
                  "<=": have <= other, ">": have > other, ">=": have >= other}[op]
        if not ok:
            return False
    return True


def require_pinned(pins: dict[str, str], requirements: list[str], lock: Path) -> None:
    """Raise LockError, in one line, when the lock lacks a requirement or pins it outside its range: installed with
    --no-deps, such a lock makes an environment that fails at its first import, and is stamped done."""
    missing, outside = [], []
    for text in requirements:
        name, specs = parse_requirement(text)
        if name not in pins:
            missing.append(name)
        elif not satisfies(pins[name], specs):
            outside.append(f"{name}=={pins[name]} (pyproject: {','.join(op + v for op, v in specs)})")
    problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
        [f"pins {', '.join(outside)} outside pyproject's range"] if outside else [])
    if problems:
        raise LockError(f"{lock.name} {' and '.join(problems)}; write the lock again with scripts/lock.sh from an "
                        "environment set up with CLIP_MOE_UNLOCKED=1 (or point CLIP_MOE_LOCK at a complete one)")


# -- the installed environment --------------------------------------------------------------------------------

def pip_check_problems(report: str) -> list[str]:
    """The lines of `pip check`'s report that are not about NO_DEPS packages' own requirements.

    Those are expected: llava-torch is installed without its dependencies because it pins torch==2.0.1,
    transformers==4.36.2, ... and asks for a web UI (gradio, fastapi, ...), while only its modeling code is used,
    which works with the versions pyproject asks for (the suite runs LLaVA's code on them). Everything else pip
    reports (a missing package, a version another package does not accept) is a broken environment."""
    skip = tuple(f"{canonical(name)} " for name in NO_DEPS)
    return [line for line in report.splitlines() if line.strip() and not canonical_line(line).startswith(skip)]


def canonical_line(line: str) -> str:
    name, _, rest = line.strip().partition(" ")
    return f"{canonical(name)} {rest}"


def pip_check(python: str) -> None:
    """Raise LockError, in one line, when `pip check` finds `python`'s environment inconsistent (see
    pip_check_problems for what is left out)."""
    try:
        result = subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True,
                                text=True)
    except OSError as err:
        raise LockError(f"cannot run {python}: {err}") from None
    problems = pip_check_problems(result.stdout + result.stderr)
    if problems:
        more = f" (and {len(problems) - 1} more: {python} -m pip check)" if len(problems) > 1 else ""
        raise LockError(f"the environment of {python} is inconsistent: {problems[0].strip().rstrip('.')}{more}; "
                        "so it is not marked set up: write the lock again with scripts/lock.sh from an environment "
                        "set up with CLIP_MOE_UNLOCKED=1 (or point CLIP_MOE_LOCK at a consistent one)")


def index_reachable(python: str) -> bool:
    """Whether pip, as configured, finds any release of pip itself (every index has one)."""
    with tempfile.TemporaryDirectory(prefix="clip-moe-index-probe.") as folder:
        try:
            result = subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir",
                                     "--disable-pip-version-check", "-d", folder, "pip"], capture_output=True,
                                    text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return result.returncode == 0


def why_setup_failed(log: str, reachable: bool) -> str:
    """One line saying why setting up the newest releases failed, from its output and whether an index answers."""
    if not reachable:
        return ("no package index is reachable (pip finds no release even of pip itself), so the newest releases "
                "were not tried; check the network, a proxy (HTTPS_PROXY) or PIP_INDEX_URL, then run it again")
    if re.search(r"ResolutionImpossible|conflicting dependencies|Cannot install .* because", log):
        return "the newest releases do not install together (see pip's conflict above)"
    missing = re.search(r"No matching distribution found for (\S+)", log)
    if missing:
        return f"no release of {missing.group(1)} can be installed here (see pip's message above)"
    return "setting up the newest releases failed (see the message above)"


def diff(python: str, lock: Path) -> list[tuple[str, str, str]]:
    """(package, locked, installed) for every package whose version differs; '-' where one side lacks it."""
    _, pins = read_lock(lock)
    have = installed(python)
    rows = [(name, pins.get(name, "-"), have.get(name, "-")) for name in sorted(set(pins) | set(have))
            if pins.get(name) != have.get(name)]
    return rows


def headline(lock: Path) -> str:
    """'torch 2.14.1, transformers 5.23.0, ...' for the README."""
    _, pins = read_lock(lock)
    return ", ".join(f"{name} {pins[canonical(name)]}" for name in HEADLINE if canonical(name) in pins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("write", "check", "pip-check", "diff", "headline", "why-setup-failed",
                                            "setup-extras", "no-deps"))
    parser.add_argument("log", nargs="?", type=Path, help="why-setup-failed: the set-up's output")
    parser.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help=f"lock file (default: {DEFAULT_LOCK.name})")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="what the lock must pin (default: the "
                        "checkout's pyproject.toml)")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            write(args.python, args.lock)
        elif args.command == "check":
            check(args.python, args.lock, args.pyproject)
        elif args.command == "setup-extras":
            print(",".join(SETUP_EXTRAS))
        elif args.command == "no-deps":
            print(" ".join(NO_DEPS))
        elif args.command == "pip-check":
            pip_check(args.python)
        elif args.command == "why-setup-failed":
            log = args.log.read_text(errors="replace") if args.log and args.log.is_file() else ""
            print(why_setup_failed(log, index_reachable(args.python)))
        elif args.command == "headline":
            print(headline(args.lock))
        else:
            rows = diff(args.python, args.lock)
            width = max([len(r[0]) for r in rows] + [7])
            print(f"{'package':<{width}}  {'lock':<14}  newest installed")
            for name, locked, new in rows:
                print(f"{name:<{width}}  {locked:<14}  {new}")
            if not rows:
                print("(no differences)")
    except LockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
