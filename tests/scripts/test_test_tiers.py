"""The test tiers: `bash scripts/test.sh --fast` leaves out exactly the slow tiers and the plain command (the README's
and CI's) nothing; tests/conftest.py fails a test that launches, runs a command or compiles outside its tier."""

import os
import subprocess
import sys
import tomllib

import pytest
import torch
from conftest import REPO_ROOT, TORCH_DIR, process_tier

ROOT = REPO_ROOT
TIERS = {"engines", "end_to_end", "compile", "slow"}  # what --fast leaves out


def arguments_given_pytest(tmp_path, *args: str) -> list[str]:
    """The arguments scripts/test.sh gives pytest: its real command line, with the environment's interpreter
    swapped for one that prints its arguments (a set-up environment, by setup.sh's stamp)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_MOE_UNLOCKED", "CLIP_MOE_LOCK")}
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # printf: echo would take -n as its own flag
    (venv / "bin" / "python").chmod(0o755)
    stamp = subprocess.run(["bash", "scripts/setup.sh", "--stamp"], cwd=ROOT, capture_output=True, text=True,
                           check=True, env=env).stdout
    (venv / ".clip-moe-setup").write_text(stamp)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), *args], capture_output=True, text=True,
                            timeout=60, env={**env, "CLIP_MOE_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


MARKED = """
import pytest

def test_plain(): pass

@pytest.mark.cuda
def test_cuda(): pass

@pytest.mark.engines
def test_engines(): pass

@pytest.mark.end_to_end
def test_end_to_end(): pass

@pytest.mark.compile
def test_compile(): pass

@pytest.mark.slow
def test_slow(): pass

@pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.engines)])
def test_param(x): pass
"""


def selected(tmp_path, *args: str) -> set[str]:
    """The tests a real pytest selects from MARKED with `args`."""
    folder = tmp_path / "suite"
    folder.mkdir(exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\n")  # its own root: neither this project's options nor conftest
    (folder / "test_marked.py").write_text(MARKED)
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                            cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 5), result.stdout + result.stderr
    return {line.split("::", 1)[1] for line in result.stdout.splitlines() if "::" in line}


@pytest.mark.end_to_end
def test_fast_leaves_out_exactly_the_slow_tiers_and_the_plain_command_nothing(tmp_path):
    parallel = ["-n", "2", "--dist", "loadgroup"]  # two xdist workers, the launches grouped (tests/conftest.py)
    assert arguments_given_pytest(tmp_path, "-q", "-k", "x") == ["-m", "pytest", *parallel, "-q", "-k", "x"]
    fast = arguments_given_pytest(tmp_path, "--fast", "-q", "-k", "x")
    assert fast[:7] == ["-m", "pytest", *parallel, "-m"] and fast[8:] == ["-q", "-k", "x"], fast
    fast = fast[:2] + fast[6:]  # the selection at the index the checks below read it
    everything = {"test_plain", "test_cuda", "test_engines", "test_end_to_end", "test_compile", "test_slow",
                  "test_param[1]", "test_param[2]"}
    assert selected(tmp_path) == everything
    assert selected(tmp_path, "-m", fast[3]) == {"test_plain", "test_cuda", "test_param[1]"}


def test_the_tiers_are_registered_and_nothing_deselects_them_by_default():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    described = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in options["markers"]}
    assert TIERS | {"cuda"} <= described.keys() and all(described.values()), described
    assert "-m" not in options["addopts"].split()
    assert "bash scripts/test.sh -q\n" in (ROOT / ".ci" / "run").read_text()  # CI: the plain command


@pytest.mark.parametrize("argv, tier", [
    ([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "upcycle"], "engines"),
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "x.py"], "engines"),
    ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module", "m"], "engines"),
    (["/venv/bin/torchrun", "x.py"], "engines"),
    (["accelerate", "launch", "-m", "upcycle"], "engines"),
    ("deepspeed --num_gpus 2 --module mllm_bridge.train", "engines"),
    ([sys.executable, "-m", "upcycle", "sparse"], "end_to_end"),
    ([sys.executable, ROOT / "scripts" / "gpu_check.py"], "end_to_end"),
    (["bash", "scripts/setup.sh", "--stamp"], "end_to_end"),
    (["/repo/scripts/demo.sh"], "end_to_end"),
    ([sys.executable, str(TORCH_DIR / "_inductor" / "compile_worker" / "__main__.py"), "--pickler=x"], "compile"),
    ([sys.executable, "-c", "pass"], None),
    (["true"], None),
    (["bash", "-c", "true"], None),
])
def test_a_process_belongs_to_the_tier_of_what_it_runs(argv, tier):
    assert process_tier(argv) == tier


def test_an_unmarked_test_cannot_launch_run_a_command_or_compile():
    # Paths that do not exist: past the check, starting them would raise FileNotFoundError instead.
    for argv, tier in [(["/nowhere/torchrun", "x.py"], "engines"), (["/nowhere/python", "-m", "upcycle"], "end_to_end"),
                       (["bash", "/nowhere/demo.sh"], "end_to_end")]:
        with pytest.raises(pytest.fail.Exception, match=f"mark it @pytest.mark.{tier}"):
            subprocess.run(argv)
    with pytest.raises(pytest.fail.Exception, match="calls torch.compile: mark it @pytest.mark.compile"):
        torch.compile(torch.nn.Linear(2, 2))
    with pytest.raises(pytest.fail.Exception, match="calls torch.export.export: mark it @pytest.mark.compile"):
        torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0  # a snippet is no command


@pytest.mark.engines
def test_a_marked_test_may_start_its_tier():
    with pytest.raises(FileNotFoundError):
        subprocess.run(["/nowhere/torchrun", "x.py"])
    with pytest.raises(FileNotFoundError):  # a launch runs commands too
        subprocess.run(["/nowhere/python", "-m", "upcycle"])
