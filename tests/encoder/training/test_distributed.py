"""The engine a launch asks for is the engine that trains, or the run stops with one line before any step.

accelerate falls back from DeepSpeed and FSDP to one process or DDP without a word, a launch with
--use_deepspeed and no DeepSpeed installed ends in an ImportError traceback, and FSDP1 is not what the loop
checkpoints: each of these is refused.
"""

import importlib.util
import types

import pytest
from accelerate.utils import DistributedType

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
