"""The multi-process launches of the engine tests (`from helpers.launchers import launch`): each engine started the
way its users start it, 2 CPU processes over gloo, one thread per process, on a port nobody listens on.

Launchers default to port 29500, where another launch on the machine (a parallel test run, another checkout's) would
join this one's process group: every launch here asks for a free port instead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
ZERO2, ZERO3 = REPO_ROOT / "scripts" / "zero2.json", REPO_ROOT / "scripts" / "zero3.json"
ENGINES = {  # the launcher, and the run's own flags, per engine: ZeRO-2 by `accelerate launch --multi_gpu` with
    # LLaVA's own --deepspeed scripts/zero2.json, ZeRO-3 by the deepspeed launcher (LLaVA's finetune.sh), FSDP2 by
    # `accelerate launch --use_fsdp --fsdp_version 2`
    "ddp": ([*ACCELERATE, "--multi_gpu"], []),
    "deepspeed-zero2": ([*ACCELERATE, "--multi_gpu"], ["--deepspeed", str(ZERO2)]),
    "deepspeed-zero3": (DEEPSPEED, ["--deepspeed", str(ZERO3)]),
    "fsdp2": ([*ACCELERATE, "--use_fsdp", "--fsdp_version", "2"], []),
}
HELPERS = REPO_ROOT / "tests" / "helpers"


def free_port() -> str:
    """A port no one listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def on_free_port(launcher: list[str]) -> list[str]:
    """`launcher` (accelerate launch, torchrun or the deepspeed launcher) on a free port."""
    flag = "--main_process_port" if "accelerate.commands.launch" in launcher else "--master_port"
    return [*launcher, flag, free_port()]


def launch(launcher: list[str], script: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """`script` with `argv` under `launcher` on a free port, its output captured. `script`: ["-m", MODULE] or
    [PATH, ARGS...], as accelerate launch and torchrun take them (the deepspeed launcher spells -m as --module)."""
    if launcher[:3] == DEEPSPEED[:3] and script[0] == "-m":
        script = ["--module", *script[1:]]
    return subprocess.run([*on_free_port(launcher), *script, *argv], env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)


def stopped_after(steps: int, module: str) -> list[str]:
    """The `script` of a launch that trains as `-m module` and ends every process as a kill would once `steps`
    optimizer steps are done (tests/helpers/stop_after_steps.py)."""
    return [str(HELPERS / "stop_after_steps.py"), str(steps), module]


def copied_at(steps: int, dest, module: str) -> list[str]:
    """The `script` of a launch that trains as `-m module` to its end and, once `steps` optimizer steps are done,
    copies its output directory to `dest`: what `stopped_after(steps, module)` would leave there
    (tests/helpers/copy_at_step.py)."""
    return [str(HELPERS / "copy_at_step.py"), str(steps), str(dest), module]
