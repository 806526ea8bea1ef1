"""requirements.lock: write it from a green environment, check it fits an interpreter, compare an environment to it.

Standard library only: scripts/setup.sh runs this with the system Python before any environment exists.

    python scripts/lockfile.py write  --python VENV/bin/python [--lock requirements.lock]
    python scripts/lockfile.py check  --python PYTHON          [--lock requirements.lock]
    python scripts/lockfile.py diff   --python VENV/bin/python [--lock requirements.lock]

The lock pins every installed distribution except the project itself (pip freeze --exclude-editable),
with a header naming the Python (major.minor) and machine it was made on; setup.sh installs it with
`pip install --no-deps -r`, so what is installed is exactly what the suite passed with.
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

DEFAULT_LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
PROJECT = "clip-moe-toolkit"
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
    """{canonical name: version} of what an interpreter's environment holds (the project excluded)."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    skip = {canonical(PROJECT), "pip", "setuptools", "wheel"}
    return {canonical(p["name"]): p["version"] for p in json.loads(out) if canonical(p["name"]) not in skip}


def check(python: str, lock: Path) -> None:
    """Raise LockError when the lock was made for another Python or machine than `python`."""
    header, _ = read_lock(lock)
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
    """Freeze `python`'s environment into `lock`, atomically."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    pins = sorted((line for line in out.splitlines() if _PIN.match(line)), key=lambda l: canonical(l.split("==")[0]))
    unpinned = [line for line in out.splitlines() if line.strip() and not _PIN.match(line) and not line.startswith("#")]
    if unpinned:
        raise LockError(f"cannot pin {unpinned[0]!r} (installed from a path or URL); install it from the index")
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
    parser.add_argument("command", choices=("write", "check", "diff", "headline"))
    parser.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help=f"lock file (default: {DEFAULT_LOCK.name})")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            write(args.python, args.lock)
        elif args.command == "check":
            check(args.python, args.lock)
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
