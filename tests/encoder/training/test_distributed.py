"""The engine a launch asks for is the engine that trains, or the run stops with one line before any step.

accelerate drops DeepSpeed and FSDP on the CPU without a word, a launch with --use_deepspeed and no DeepSpeed
installed ends in an ImportError traceback, and FSDP or ZeRO-3 shard the parameters the trainers save from the
main process (ZeRO-3 wrote empty tensors and exited 0): each of these is refused.
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


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed here")
def test_use_deepspeed_without_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match=r"--use_deepspeed: DeepSpeed is not installed here; pip install deepspeed"):
        make_accelerator()


def test_fsdp_that_accelerate_drops_on_the_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"launched with --use_fsdp but runs this as (NO|MULTI_CPU): accelerate runs "
                                        r"FSDP only on GPUs"):
        make_accelerator()


def test_fsdp_itself_is_refused_until_the_loop_writes_sharded_state():
    with pytest.raises(UserError, match="FSDP is not supported by this training loop yet"):
        check_engine(fake_accelerator("FSDP"), distributed.ENGINE_REQUESTS["ACCELERATE_USE_FSDP"])


def test_the_engine_asked_for_passes():
    check_engine(fake_accelerator("DEEPSPEED", 2), distributed.ENGINE_REQUESTS["ACCELERATE_USE_DEEPSPEED"])
    check_engine(fake_accelerator("MULTI_CPU"), None)


def test_upcycles_trainer_refuses_zero3(monkeypatch):
    from upcycle.train import trainer

    monkeypatch.setattr(trainer, "make_accelerator", lambda *a, **k: fake_accelerator("DEEPSPEED", 3))
    with pytest.raises(UserError, match="ZeRO stage 3 is not supported by upcycle's trainer yet"):
        trainer._accelerator("fp32", 1)
    monkeypatch.setattr(trainer, "make_accelerator", lambda *a, **k: fake_accelerator("DEEPSPEED", 2))
    assert trainer._accelerator("fp32", 1).state.deepspeed_plugin.zero_stage == 2


def test_upcycle_train_launched_with_fsdp_on_the_cpu_stops_with_one_line(monkeypatch, capsys, tmp_path,
                                                                           base_clip_dir, grids_dir):
    from upcycle.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "out"
    code = main(["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "launched with --use_fsdp" in err[0], err
    assert not out.exists()
