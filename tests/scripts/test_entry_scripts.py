"""The thin shell entry points run from any folder and leave relative paths to the caller's folder."""

import os
import subprocess

import pytest
from conftest import REPO_ROOT

ROOT = REPO_ROOT
pytestmark = pytest.mark.end_to_end  # the scripts run as a user runs them
USER_SCRIPTS = ("demo", "replicate", "pretrain_projector", "finetune", "eval_lmms")


@pytest.mark.parametrize("name", USER_SCRIPTS)
def test_a_user_script_keeps_the_callers_folder(name, tmp_path):
    script = ROOT / "scripts" / f"{name}.sh"
    assert 'cd "$root"' not in script.read_text(), f"{script.name} changes into the checkout"
    # The real command line, with the interpreter swapped for one that reports its working folder.
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\npwd\n")
    (fake / "python").chmod(0o755)
    (tmp_path / "venv" / ".clip-moe-setup").write_text(setup_stamp())
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_MOE_UNLOCKED", "CLIP_MOE_LOCK")}
    result = subprocess.run(["bash", str(script), "--out", "relative"], cwd=work, capture_output=True, text=True,
                            timeout=60, env={**env, "CLIP_MOE_VENV": str(tmp_path / "venv")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(work)


def setup_stamp() -> str:
    """What scripts/setup.sh writes after a successful set-up, so it skips itself for the fake environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_MOE_UNLOCKED", "CLIP_MOE_LOCK")}
    return subprocess.run(["bash", "scripts/setup.sh", "--stamp"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=env).stdout
