"""The engine a launch asks for is the engine that trains, or the run stops with one line before any step.

accelerate falls back from DeepSpeed and FSDP to one process or DDP without a word, a launch with
--use_deepspeed and no DeepSpeed installed ends in an ImportError traceback, and FSDP1 is not what the loop
checkpoints: each of these is refused.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from accelerate.utils import DistributedType
from conftest import REPO_ROOT

from encoder.training import distributed
from encoder.training.distributed import check_engine, make_accelerator
from encoder.utils.errors import UserError


def fake_accelerator(kind: str, zero_stage: int | None = None):
    plugin = types.SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return types.SimpleNamespace(distributed_type=DistributedType[kind],
                                 state=types.SimpleNamespace(deepspeed_plugin=plugin))


def test_use_deepspeed_without_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match=r"--use_deepspeed: DeepSpeed is not installed here; pip install 'clip-moe-toolkit\[deepspeed\]'"):
        make_accelerator()


def test_fsdp1_is_refused_for_fsdp2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(UserError, match=r"--use_fsdp: only FSDP2 is supported .*add --fsdp_version 2"):
        make_accelerator()


def test_an_engine_that_falls_back_to_one_process_is_refused(monkeypatch):
    """accelerate turns FSDP into no engine at all with one process: the run would not be what was asked."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=r"launched with --use_fsdp but runs this as NO; launch FSDP with "
                                        r"--num_processes 2 or more"):
        make_accelerator()


def test_the_engine_asked_for_passes():
    check_engine(fake_accelerator("DEEPSPEED", 2), distributed.ENGINE_REQUESTS["ACCELERATE_USE_DEEPSPEED"])
    check_engine(fake_accelerator("FSDP"), distributed.ENGINE_REQUESTS["ACCELERATE_USE_FSDP"])
    check_engine(fake_accelerator("MULTI_CPU"), None)
    with pytest.raises(UserError, match="launched with --use_deepspeed but runs this as MULTI_CPU"):
        check_engine(fake_accelerator("MULTI_CPU"), distributed.ENGINE_REQUESTS["ACCELERATE_USE_DEEPSPEED"])


def test_upcycle_train_launched_with_fsdp1_stops_with_one_line(monkeypatch, capsys, tmp_path,
                                                                           base_clip_dir, grids_dir):
    from upcycle.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    out = tmp_path / "out"
    code = main(["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--use_fsdp: only FSDP2 is supported" in err[0], err
    assert not out.exists()


# -- the end of a run ----------------------------------------------------------------------------------------------

LEAVE_AFTER_FSDP2 = """
import os, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from encoder.training.distributed import leave_process_group

def gloo_threads():
    return sum("gloo" in (task / "comm").read_text() for task in Path("/proc/self/task").iterdir())

def train():  # FSDP2 per layer and at the root, a step and the gathered weights, as the loop runs them
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(2, 4)).sum().backward()
    return {name: value.full_tensor() for name, value in model.state_dict().items()}

dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])

def barrier(group=dist.group.WORLD, *, also=dist.group.WORLD):  # as DeepSpeed's TorchBackend.barrier holds it
    return group, also

train()
print("before", gloo_threads(), flush=True)
leave_process_group()
print("after", gloo_threads(), dist.is_initialized(), barrier(), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_leaving_the_process_group_after_fsdp2_ends_gloo_threads(tmp_path):
    """After an FSDP2 run, destroy_process_group alone leaves the gloo group's backend and threads alive (torch's
    DTensor caches hold the device mesh, which holds the group; so does a default argument evaluated while the group
    existed, as DeepSpeed's barrier has one) into the interpreter's finalization, where they can abort a finished
    run; leave_process_group ends them while Python is alive. In a process of its own: the group is process-wide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    run = subprocess.run([sys.executable, "-c", LEAVE_AFTER_FSDP2, port], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = run.stdout.splitlines()[-2:]
    assert int(before.split()[1]) > 0  # the run had them: the check below could fail
    assert after == "after 0 False (None, None)", run.stdout
