"""requirements.lock and the set-up that installs it: the lock fits this environment, and a lock for another
Python or a malformed one stops the set-up with one line before anything is written."""

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

ROOT = REPO_ROOT
pytestmark = pytest.mark.end_to_end  # every test runs scripts/lockfile.py or scripts/setup.sh
LOCKFILE = [sys.executable, str(ROOT / "scripts" / "lockfile.py")]


def run(*args, **env):
    import os

    # Not the settings of a surrounding run (scripts/check_latest.sh exports CLIP_MOE_UNLOCKED=1 for its suite).
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_MOE_")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env={**base, **env})


def test_the_committed_lock_fits_this_interpreter_and_pins_the_stack():
    assert run(*LOCKFILE, "check", "--python", sys.executable).returncode == 0
    headline = run(*LOCKFILE, "headline").stdout
    for name in ("torch ", "transformers ", "accelerate ", "open-clip-torch ", "lmms-eval 0.7.3", "llava-torch "):
        assert name in headline, headline
    readme = (ROOT / "README.md").read_text()
    assert headline.strip() in readme, "README's tested versions differ from requirements.lock"


def test_diff_lists_what_differs_from_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    assert run(*LOCKFILE, "write", "--python", sys.executable, "--lock", str(lock)).returncode == 0  # this env
    lines = lock.read_text().splitlines()
    pinned = [i for i, l in enumerate(lines) if l.startswith("tqdm==")]
    assert pinned, "tqdm is not in the lock"
    lines[pinned[0]] = "tqdm==0.0.1"
    lock.write_text("\n".join(lines + ["not-installed-anywhere==1.0", ""]))
    result = run(*LOCKFILE, "diff", "--python", sys.executable, "--lock", str(lock))
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["tqdm"][0] == "0.0.1" and rows["not-installed-anywhere"] == ["1.0", "-"]
    assert len(rows) == 2, result.stdout


def test_setup_refuses_a_lock_for_another_python_with_one_line_and_writes_nothing(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text((ROOT / "requirements.lock").read_text().replace("# python: 3.", "# python: 2.", 1))
    venv = tmp_path / "venv"
    result = run("bash", str(ROOT / "scripts" / "setup.sh"), CLIP_MOE_LOCK=str(lock), CLIP_MOE_VENV=str(venv))
    assert result.returncode != 0 and not venv.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was made with Python 2." in lines[0] and "CLIP_MOE_PYTHON" in lines[0], lines


def test_setup_refuses_a_malformed_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# python: %d.%d\ntorch>=2\n" % sys.version_info[:2])
    venv = tmp_path / "venv"
    result = run("bash", str(ROOT / "scripts" / "setup.sh"), CLIP_MOE_LOCK=str(lock), CLIP_MOE_VENV=str(venv))
    assert result.returncode != 0 and not venv.exists()
    assert result.stderr.strip().count("\n") == 0 and "is not NAME==VERSION" in result.stderr
