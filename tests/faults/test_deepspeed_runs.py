"""Fault tier, DeepSpeed as LLaVA's users run it.

- bf16 under an engine: DeepSpeed holds the whole model in bf16 and nothing autocasts, so fp32 images met bf16
  weights ("mat1 and mat2 must have the same dtype") at the first step; float inputs are now cast to the engine's
  dtype, as an HF Trainer casts them.
- one engine process (`deepspeed --num_gpus 1`, `torchrun --nproc_per_node 1`, `accelerate launch
  --num_processes 1 --use_deepspeed`) died before its first step ("'int' object is not iterable").
- configs: values the loop owns that a config contradicts, sections the loop replaces (optimizer, scheduler),
  keys DeepSpeed ignores or rejects, and an "auto" nothing fills are refused in one line before the model is built;
  the config's content is part of the resume settings.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from encoder.training import deepspeed_config
from encoder.training.deepspeed_config import KNOWN_KEYS, LoopOwned, check_launch, engine_settings
from encoder.training.sharded import engine_input_dtype
from encoder.utils.errors import UserError

ZERO2, ZERO3 = REPO_ROOT / "scripts" / "zero2.json", REPO_ROOT / "scripts" / "zero3.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LLAVA_LOOP = LoopOwned(accumulation=2, batch=4, max_grad_norm=1.0, precision="bf16",
                       accumulation_flag="--gradient_accumulation_steps", batch_flag="--per_device_train_batch_size",
                       clipping_flag="--max_grad_norm", precision_flag="--bf16",
                       optimizer_flags="--learning_rate, --weight_decay", schedule_flags="--lr_scheduler_type")
LAUNCH_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "WORLD_SIZE",
                    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                    "ACCELERATE_DEEPSPEED_ZERO_STAGE")


@pytest.fixture
def launch(monkeypatch, tmp_path):
    """Set the environment a launch gives a worker: DeepSpeed with CONFIG (a dict, written to a file), N processes."""
    for name in LAUNCH_VARIABLES:  # restored afterwards, also where the code under test sets them (make_accelerator)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def start(config: dict | None, processes: int = 2, **variables: str) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        if config is not None:
            path = tmp_path / "ds.json"
            path.write_text(json.dumps(config))
            monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
            monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return start


def zero2(**changes) -> dict:
    config = json.loads(ZERO2.read_text())
    config.update(changes)
    return config


def test_llavas_own_configs_fit_every_run(launch):
    for path in (ZERO2, ZERO3):
        launch(json.loads(path.read_text()), processes=3)
        check_launch(LLAVA_LOOP)


# (what the config says, what the one line must name): each was taken silently or failed on every rank after the
# model was built. The loop: 2 processes x 4 samples x 2 accumulation, clipping at 1.0, bf16.
REFUSED = [
    (zero2(gradient_accumulation_steps=4),
     '"gradient_accumulation_steps": 4 but --gradient_accumulation_steps is 2'),
    (zero2(train_micro_batch_size_per_gpu=8),
     '"train_micro_batch_size_per_gpu": 8 but --per_device_train_batch_size is 4'),
    (zero2(train_batch_size=32), '"train_batch_size": 32 but the run\'s is 16 (4 per process x 2 accumulation x 2'),
    (zero2(gradient_clipping=0.5), '"gradient_clipping": 0.5 but --max_grad_norm is 1.0'),
    (zero2(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}}),
     'a "scheduler" section, but the run has its own learning-rate schedule (--lr_scheduler_type)'),
    (zero2(optimizer={"type": "AdamW", "params": {"lr": "auto"}}),
     'an "optimizer" section, but the run trains with its own AdamW (--learning_rate, --weight_decay)'),
    ({("zero_optimisation" if k == "zero_optimization" else k): v for k, v in zero2().items()},
     'unknown key "zero_optimisation" (did you mean "zero_optimization"?)'),
    (zero2(gradient_acumulation_steps=2),
     'unknown key "gradient_acumulation_steps" (did you mean "gradient_accumulation_steps"?)'),
    (zero2(zero_optimization={"stage": 2, "sub_group_size": "auto"}),
     '"zero_optimization.sub_group_size": "auto", which nothing fills in for this run'),
    (zero2(zero_optimization={"stage": 2, "overlap_communication": True}),
     "DeepSpeed rejects it (DeepSpeedZeroConfig: overlap_communication: Extra inputs are not permitted)"),
    (zero2(fp16={"enabled": True}), '"fp16.enabled": true but --bf16 asks for bf16'),
]


@pytest.mark.parametrize("config, named", REFUSED, ids=[named[:40] for _, named in REFUSED])
def test_a_config_that_contradicts_the_run_or_the_engine_is_refused_in_one_line(launch, config, named):
    launch(config)
    with pytest.raises(UserError) as refused:
        check_launch(LLAVA_LOOP)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the DeepSpeed config ") and named in message, message


def test_accelerate_launchs_own_accumulation_must_agree_under_any_engine(launch):
    """accelerate prefers `accelerate launch --gradient_accumulation_steps` to the run's flag (DDP too), and under
    DeepSpeed the launch flag fills the config's "auto"."""
    launch(None, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4")
    with pytest.raises(UserError, match="accelerate launch --gradient_accumulation_steps 4 but "
                                        "--gradient_accumulation_steps is 2"):
        check_launch(LLAVA_LOOP)
    launch(None, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    check_launch(LLAVA_LOOP)
    launch(zero2(gradient_clipping="auto"), ACCELERATE_GRADIENT_CLIPPING="0.5")
    with pytest.raises(UserError, match='"gradient_clipping": 0.5 but --max_grad_norm is 1.0'):
        check_launch(LLAVA_LOOP)


def test_a_global_batch_flag_is_shared_by_the_processes(launch):
    """upcycle's --batch-size is the global batch: its per-process share is what the config must repeat."""
    loop = LoopOwned(accumulation=1, batch=16, batch_is_global=True, max_grad_norm=0.0, precision="no",
                     accumulation_flag="--grad-accum", batch_flag="--batch-size", clipping_flag="--max-grad-norm",
                     precision_flag="--precision", optimizer_flags="--lr", schedule_flags="--warmup-ratio")
    launch(zero2(train_micro_batch_size_per_gpu=8, train_batch_size=16, gradient_clipping=0.0))
    check_launch(loop)
    launch(zero2(train_micro_batch_size_per_gpu=16), processes=2)
    with pytest.raises(UserError, match='"train_micro_batch_size_per_gpu": 16 but --batch-size 16 over 2 '
                                        r'process\(es\) gives 8'):
        check_launch(loop)


def test_known_keys_are_the_keys_deepspeed_reads():
    """KNOWN_KEYS holds every top-level key the installed DeepSpeed's config parser looks up (recorded by a dict
    that notes each lookup), so a valid config is never refused as unknown."""
    from deepspeed.runtime.config import DeepSpeedConfig

    looked_up = set()

    class Keys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, key):
            looked_up.add(key)
            return dict.__contains__(self.d, key)

        def __iter__(self):
            return iter(dict.keys(self.d))

    class Recording(dict):
        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            looked_up.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            looked_up.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(self)

        def __copy__(self):
            return self

    DeepSpeedConfig(Recording({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}))
    assert looked_up and looked_up <= KNOWN_KEYS, sorted(looked_up - KNOWN_KEYS)


def test_the_configs_content_is_in_the_resume_settings(launch, tmp_path):
    engine = SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"))
    launch(zero2())
    check_launch(LLAVA_LOOP)  # what the Accelerator is made with
    recorded = engine_settings(engine)
    assert recorded["deepspeed_config.zero_optimization.stage"] == 2
    assert recorded["deepspeed_config.bf16.enabled"] == "auto"
    launch(zero2(bf16={"enabled": True}))  # the file edited while the run trains: the run's record stays
    assert engine_settings(engine) == recorded
    check_launch(LLAVA_LOOP)  # the resume, made under the edited file
    from encoder.utils.step_record import differences

    assert differences(recorded, engine_settings(engine)) == ["deepspeed_config.bf16.enabled: auto -> True"]
    assert engine_settings(SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_CPU"))) == {}


def test_float_inputs_follow_the_engines_dtype():
    def accelerator(kind, precision):
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), mixed_precision=precision)

    assert engine_input_dtype(accelerator("DEEPSPEED", "bf16")) is torch.bfloat16
    assert engine_input_dtype(accelerator("DEEPSPEED", "fp16")) is torch.float16
    assert engine_input_dtype(accelerator("DEEPSPEED", "no")) is None
    assert engine_input_dtype(accelerator("MULTI_GPU", "bf16")) is None  # autocast does it there


def test_a_refused_config_stops_a_launched_llava_run_before_the_model_is_built(launch, monkeypatch, capsys, tmp_path,
                                                                              digit_llm_dir, clip_moe_dir, grids_dir):
    from mllm_bridge.train import run as run_module
    from mllm_bridge.train.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the DeepSpeed config was checked")

    monkeypatch.setattr(run_module, "build_training_model", refuse)
    launch(None)  # WORLD_SIZE: a launched run, in which --deepspeed turns DeepSpeed on
    config = tmp_path / "zero2-ga4.json"
    config.write_text(json.dumps(zero2(gradient_accumulation_steps=4)))
    out = tmp_path / "llava-refused"
    code = main(["finetune", *llava_flags(digit_llm_dir, clip_moe_dir, grids_dir, out), "--deepspeed", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: the DeepSpeed config {config} does not fit this run: "
                             '"gradient_accumulation_steps": 4 but --gradient_accumulation_steps is 1'), err
    assert not out.exists() or not any(out.iterdir())


def test_a_refused_config_stops_upcycle_train_before_the_model_loads(launch, monkeypatch, capsys, tmp_path):
    from upcycle.cli import main
    from upcycle.train import command

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the DeepSpeed config was checked")

    monkeypatch.setattr(command, "load_clip", refuse)
    launch(zero2(gradient_accumulation_steps=4), processes=1)
    out = tmp_path / "refused"
    code = main(["train", "--model", str(tmp_path / "any-clip"), "--train-data", str(tmp_path / "pairs.json"),
                 "--out", str(out), "--batch-size", "4", "--grad-accum", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert '"gradient_accumulation_steps": 4 but --grad-accum is 1' in err[0], err
    assert not out.exists()


def test_a_refused_config_stops_upcycle_dmu_before_the_base_loads(launch, monkeypatch, capsys, tmp_path):
    from upcycle.cli import main
    from upcycle.recipes.dmu import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("DMU started before the DeepSpeed config was checked")

    monkeypatch.setattr(pipeline.DMURun, "run", refuse)
    launch(zero2(gradient_clipping=0.5), processes=1)
    out = tmp_path / "refused"
    code = main(["dmu", "--base", str(tmp_path / "any-clip"), "--train-data", str(tmp_path / "pairs.json"),
                 "--out", str(out), "--batch-size", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "gradient_clipping" in err[0], err
    assert not out.exists() and not (tmp_path / "refused.dmu-work").exists()


# -- launched runs: one engine process, bf16 ------------------------------------------------------------------------

def llava_flags(llm, tower, data, out, **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / "train.json", image_folder=data,
                  output_dir=out, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                  save_steps=1, save_total_limit=2, report_to="none", seed=0)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def needs_bf16():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support")


def free_port() -> str:
    """A port no one listens on now: launchers default to 29500, which other runs on the machine may hold."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, check=False)


def trained(out) -> dict:
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    return SimpleNamespace(state=state, weights=weights)


@pytest.mark.slow
@pytest.mark.engines
def test_llava_bf16_under_zero3_in_one_process_of_the_deepspeed_launcher(tmp_path, digit_llm_dir, clip_moe_dir,
                                                                          grids_dir):
    """LLaVA's finetune.sh (ZeRO-3 config, --bf16 True) by the deepspeed launcher with one process."""
    needs_bf16()
    out = tmp_path / "llava-zero3"
    done = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                "--master_port", free_port(), "--module", "mllm_bridge.train",
                "finetune", *llava_flags(digit_llm_dir, clip_moe_dir, grids_dir, out, bf16=True),
                "--deepspeed", str(ZERO3)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = trained(out)
    assert result.state["engine"] == "deepspeed-zero3" and len(result.state["parameters_held_per_rank"]) == 1
    assert all(math.isfinite(x) for x in result.state["first_losses"])
    start = load_file(str(digit_llm_dir / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert torch.isfinite(result.weights[key].float()).all()
    assert not torch.allclose(result.weights[key].float(), start[key].float(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.engines
def test_llava_bf16_config_under_zero2_in_one_torchrun_process_resumes_only_under_the_same_config(
        tmp_path, digit_llm_dir, clip_moe_dir, grids_dir):
    """A config that turns bf16 on itself, by torchrun with one process: killed after step 1, refused on resume once
    the config was edited (its content is a resume setting, its path is not), then resumed under the original."""
    needs_bf16()
    config = tmp_path / "zero2-bf16.json"
    original = zero2(bf16={"enabled": True})
    config.write_text(json.dumps(original))
    out = tmp_path / "llava-zero2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", free_port()]
    flags = [*llava_flags(digit_llm_dir, clip_moe_dir, grids_dir, out), "--deepspeed", str(config)]
    killed = run([*torchrun, str(REPO_ROOT / "tests" / "helpers" / "stop_after_steps.py"), "1", "mllm_bridge.train",
                  "finetune", *flags])
    assert killed.returncode != 0 and (out / "checkpoint-1" / "trainer_state.json").is_file(), killed.stderr[-3000:]
    config.write_text(json.dumps(zero2(bf16={"enabled": False})))
    refused = run([*torchrun, "-m", "mllm_bridge.train", "finetune", *flags])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]
    assert "deepspeed_config.bf16.enabled: True -> False" in errors[0], errors
    moved = tmp_path / "moved" / "zero2-bf16.json"  # the same content elsewhere: the path is not a setting
    moved.parent.mkdir()
    moved.write_text(json.dumps(original))
    resumed = run([*torchrun, "-m", "mllm_bridge.train", "finetune", *flags[:-1], str(moved)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-1'} (step 1 of 2)" in resumed.stdout
    result = trained(out)
    assert result.state["engine"] == "deepspeed-zero2" and len(result.state["parameters_held_per_rank"]) == 1
    assert all(torch.isfinite(w.float()).all() for w in result.weights.values())


@pytest.mark.slow
@pytest.mark.engines
def test_upcycle_bf16_in_one_process_of_accelerate_launch_use_deepspeed(tmp_path, base_clip_dir, grids_dir):
    """upcycle's trainer, --precision bf16, under `accelerate launch --num_processes 1 --use_deepspeed`."""
    needs_bf16()
    out = tmp_path / "out"
    done = run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                "--use_deepspeed", "--zero_stage", "2",
                "-m", "upcycle", "train", "--model", str(base_clip_dir), "--out", str(out),
                "--train-data", str(grids_dir / "train.json"), "--precision", "bf16", "--max-steps", "2",
                "--batch-size", "16", "--checkpoint-every", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out.with_name("out.train-work") / "step-2" / "state.json").read_text())
    assert state["engine"] == "deepspeed-zero2" and len(state["parameters_held_per_rank"]) == 1
    assert state["identity"][deepspeed_config.SETTING_PREFIX + "zero_optimization.stage"] == 2
