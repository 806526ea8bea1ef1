"""Fault tier, set-up and scripts: an incomplete lock or an inconsistent environment is never stamped set up; the
GPU check runs from any folder and names what is wrong in one line; check_latest tells an unreachable index from
releases that conflict."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

ROOT = REPO_ROOT
SETUP = ROOT / "scripts" / "setup.sh"
LOCKFILE = [sys.executable, str(ROOT / "scripts" / "lockfile.py")]


def _lockfile_module():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, cwd=None, **env):
    # Not the settings of a surrounding run (scripts/check_latest.sh exports CLIP_MOE_UNLOCKED=1 for its suite).
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_MOE_", "GPU_CHECK_"))}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd, env={**base, **env})


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def committed_lock_with(tmp_path, drop: str = "", replace: tuple[str, str] | None = None):
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    if drop:
        lines = [line for line in lines if not line.startswith(f"{drop}==")]
    if replace:
        lines = [replace[1] if line.startswith(f"{replace[0]}==") else line for line in lines]
    lock = tmp_path / "requirements.lock"
    lock.write_text("\n".join(lines) + "\n")
    return lock


@pytest.mark.parametrize("drop, replace, says", [
    ("transformers", None, "requirements.lock lacks transformers; write the lock again with scripts/lock.sh"),
    ("", ("transformers", "transformers==5.40.0"),
     "requirements.lock pins transformers==5.40.0 (pyproject: >=5.23,<5.40) outside pyproject's range"),
    ("deepspeed", None, "requirements.lock lacks deepspeed"),  # an extra the set-up installs
    ("llava-torch", None, "requirements.lock lacks llava-torch"),  # installed without dependencies, so not pulled in
], ids=["a dependency missing", "a version outside the range", "an extra missing", "llava-torch missing"])
@pytest.mark.end_to_end
def test_setup_refuses_a_lock_that_does_not_pin_pyprojects_requirements_before_writing_anything(
        tmp_path, drop, replace, says):
    lock = committed_lock_with(tmp_path, drop, replace)
    checked = run(*LOCKFILE, "check", "--python", sys.executable, "--lock", str(lock))
    assert checked.returncode == 2 and len(error_lines(checked)) == 1 and says in checked.stderr, checked.stderr
    venv = tmp_path / "venv"
    result = run("bash", str(SETUP), CLIP_MOE_LOCK=str(lock), CLIP_MOE_VENV=str(venv))
    assert result.returncode != 0 and not venv.exists()
    lines = error_lines(result)
    assert len(lines) == 1 and says in lines[0], lines


def test_the_committed_lock_pins_every_requirement_the_set_up_installs():
    lockfile = _lockfile_module()
    _, pins = lockfile.read_lock(ROOT / "requirements.lock")
    requirements = lockfile.setup_requirements(ROOT / "pyproject.toml")
    assert {"torch", "transformers", "pytest", "lmms-eval", "deepspeed", "llava-torch"} <= {
        lockfile.parse_requirement(r)[0] for r in requirements}
    lockfile.require_pinned(pins, requirements, ROOT / "requirements.lock")  # raises if not


LLAVA_COMPLAINTS = """\
llava-torch 1.2.2.post1 requires gradio, which is not installed.
llava-torch 1.2.2.post1 has requirement torch==2.0.1, but you have torch 2.14.1.
llava-torch 1.2.2.post1 has requirement transformers==4.36.2, but you have transformers 5.23.0.
"""
BROKEN = "torch 2.14.1 has requirement setuptools>=77.0.3, but you have setuptools 65.5.0.\n"


def test_pip_checks_complaints_leave_out_exactly_llava_torchs_own_pins():
    lockfile = _lockfile_module()
    assert lockfile.pip_check_problems(LLAVA_COMPLAINTS) == []
    assert lockfile.pip_check_problems(LLAVA_COMPLAINTS + BROKEN + "lmms-eval 0.7.3 requires sacrebleu, which is "
                                       "not installed.\n") == [
        BROKEN.strip(), "lmms-eval 0.7.3 requires sacrebleu, which is not installed."]


def fake_environment(tmp_path, pip_check_report: str):
    """A CLIP_MOE_VENV whose python installs nothing and answers `pip check` with `pip_check_report` (exit 1 when
    it reports anything, as pip does); everything else goes to this interpreter (the lock's Python)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    report = tmp_path / "pip-check.txt"
    report.write_text(pip_check_report)
    python = venv / "bin" / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m pip install" ]]; then exit 0; fi
if [[ "$1 $2 $3" == "-m pip check" ]]; then cat "{report}"; [[ ! -s "{report}" ]]; exit; fi
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    return venv


@pytest.mark.end_to_end
def test_setup_does_not_stamp_an_environment_that_pip_check_finds_broken(tmp_path):
    venv = fake_environment(tmp_path, LLAVA_COMPLAINTS + BROKEN)
    result = run("bash", str(SETUP), CLIP_MOE_VENV=str(venv))
    assert result.returncode != 0 and not (venv / ".clip-moe-setup").exists()
    lines = [line for line in error_lines(result) if not line.startswith("[setup]")]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: the environment of {venv / 'bin' / 'python'} is inconsistent: torch 2.14.1 has requirement "
        "setuptools>=77.0.3, but you have setuptools 65.5.0;"), lines
    # llava-torch's own pins alone are expected (it is installed without its dependencies): set up, stamped.
    (tmp_path / "pip-check.txt").write_text(LLAVA_COMPLAINTS)
    result = run("bash", str(SETUP), CLIP_MOE_VENV=str(venv))
    assert result.returncode == 0, result.stderr
    assert (venv / ".clip-moe-setup").read_text().strip() == run("bash", str(SETUP), "--stamp").stdout.strip()


# -- gpu_check ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.end_to_end
def test_gpu_check_from_another_folder_finds_its_script_and_says_there_is_no_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run("bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), cwd=tmp_path,
                 GPU_CHECK_PYTHON=sys.executable)
    assert result.returncode == 2 and not out.exists()
    assert error_lines(result) == [
        "error: no CUDA device is visible; run scripts/gpu_check.sh on a machine with an NVIDIA GPU"]


@pytest.mark.end_to_end
def test_gpu_check_with_an_interpreter_without_torch_says_so_in_one_line(tmp_path):
    python = tmp_path / "python-without-site-packages"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages, so no torch
    python.chmod(0o755)
    result = run("bash", str(ROOT / "scripts" / "gpu_check.sh"), cwd=tmp_path, GPU_CHECK_PYTHON=str(python))
    lines = error_lines(result)
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert "cannot import torch" in lines[0] and "GPU_CHECK_PYTHON" in lines[0], lines
    result = run("bash", str(ROOT / "scripts" / "gpu_check.sh"), cwd=tmp_path,
                 GPU_CHECK_PYTHON=str(tmp_path / "no-such-python"))
    assert result.returncode == 3 and len(error_lines(result)) == 1 and "GPU_CHECK_PYTHON=" in result.stderr


# -- check_latest ---------------------------------------------------------------------------------------------

def test_a_failed_set_up_is_blamed_on_what_failed():
    lockfile = _lockfile_module()
    conflict = ("ERROR: Cannot install clip-moe-toolkit and torch==2.99 because these package versions have "
                "conflicting dependencies.\nERROR: ResolutionImpossible: for help visit ...\n")
    unreachable = ("ERROR: Could not find a version that satisfies the requirement torch>=2.9 (from versions: none)\n"
                   "ERROR: No matching distribution found for torch>=2.9\n")
    assert lockfile.why_setup_failed(conflict, reachable=True).startswith("the newest releases do not install")
    assert lockfile.why_setup_failed(unreachable, reachable=False).startswith("no package index is reachable")
    assert lockfile.why_setup_failed(unreachable, reachable=True) == (
        "no release of torch>=2.9 can be installed here (see pip's message above)")


UNREACHABLE_INDEX = dict(PIP_CONFIG_FILE="/dev/null", PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                         PIP_EXTRA_INDEX_URL="", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_CACHE_DIR="1")


@pytest.mark.slow
@pytest.mark.end_to_end
def test_check_latest_without_a_reachable_index_says_so_not_that_releases_conflict(tmp_path):
    result = run("bash", str(ROOT / "scripts" / "check_latest.sh"), cwd=tmp_path, TMPDIR=str(tmp_path),
                 **UNREACHABLE_INDEX)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no package index is reachable"), result.stderr[-2000:]
    assert "do not install together" not in result.stderr
    assert not list(tmp_path.glob("clip-moe-latest.*"))  # its throw-away environment removed


@pytest.mark.end_to_end
def test_the_lock_writer_refuses_an_environment_that_lacks_a_requirement(tmp_path):
    frozen = tmp_path / "freeze.txt"
    frozen.write_text("\n".join(line for line in (ROOT / "requirements.lock").read_text().splitlines()
                                if not line.startswith(("#", "transformers=="))) + "\n")
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [[ "$1 $2 $3" == "-m pip freeze" ]]; then cat "{frozen}"; exit; fi\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    lock = tmp_path / "requirements.lock"
    result = run(*LOCKFILE, "write", "--python", str(python), "--lock", str(lock))
    assert result.returncode == 2 and not lock.exists()
    assert len(error_lines(result)) == 1 and "lacks transformers" in result.stderr, result.stderr
