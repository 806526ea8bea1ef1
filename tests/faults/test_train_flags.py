"""Fault tier, nonsense training settings and non-finite weights: `upcycle train`, `upcycle dmu` and the Python API
refuse them with one line naming the flag, before any model is loaded or anything is written (they used to train:
--grad-accum 0 took no micro-batch, --max-steps 0 trained an epoch, --epochs 0 one step, a NaN weight was reported
as a divergence to be fixed by lowering --lr)."""

import dataclasses
import math

import pytest
import torch
from conftest import kill_after_steps
from safetensors.torch import load_file, save_file

from encoder.utils.errors import NonFiniteValues, TrainingDiverged, UserError
from upcycle.cli import main
from upcycle.recipes.dmu.config import DMUConfig
from upcycle.train import ContrastiveTrainer, TrainConfig

LEAVE_OUT = "; leave it out to train for "
DMU_NEEDS_TWO = "DMU needs at least 2 experts (the base + 1 stage)"
# command, flag, bad value, what the one line says. DMU shares the training fields' limits under its own flag names.
BAD_FLAGS = [
    ("train", "--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
    ("train", "--checkpoint-every", "0", "--checkpoint-every must be >= 1, got 0"),
    ("train", "--lr", "-1", "--lr must be > 0, got -1.0"),
    ("train", "--lr", "0", "--lr must be > 0, got 0.0"),
    ("train", "--lr", "nan", "--lr must be a finite number, got nan"),
    ("train", "--label-smoothing", "2", "--label-smoothing must be >= 0 and < 1, got 2.0"),
    ("train", "--label-smoothing", "1", "--label-smoothing must be >= 0 and < 1, got 1.0"),
    ("train", "--warmup-ratio", "5", "--warmup-ratio must be between 0 and 1, got 5.0"),
    ("train", "--warmup-ratio", "-0.1", "--warmup-ratio must be between 0 and 1, got -0.1"),
    ("train", "--max-steps", "0", "--max-steps must be >= 1, got 0; leave it out to train for --epochs"),
    ("train", "--epochs", "0", "--epochs must be > 0, got 0.0"),
    ("train", "--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("train", "--weight-decay", "-1", "--weight-decay must be >= 0, got -1.0"),
    ("train", "--max-grad-norm", "0", "--max-grad-norm must be > 0, got 0.0; use 'none' to train without clipping"),
    ("train", "--max-grad-norm", "-1", "--max-grad-norm must be > 0, got -1.0; use 'none' to train without clipping"),
    ("train", "--aux-loss-coef", "-0.01", "--aux-loss-coef must be >= 0, got -0.01"),
    ("train", "--z-loss-coef", "-1", "--z-loss-coef must be >= 0, got -1.0"),
    ("train", "--logit-scale", "0", "--logit-scale must be > 0, got 0.0; pass 'learnable' for the model's own"),
    ("train", "--logit-scale", "-100", "--logit-scale must be > 0, got -100.0; pass 'learnable' for the model's own"),
    ("train", "--num-workers", "-1", "--num-workers must be >= 0, got -1"),
    ("train", "--seed", "-1", "--seed must be >= 0, got -1"),
    ("dmu", "--lr", "-1", "--lr must be > 0, got -1.0"),
    ("dmu", "--router-lr", "0", "--router-lr must be > 0, got 0.0"),
    ("dmu", "--stage-max-steps", "0", "--stage-max-steps must be >= 1, got 0" + LEAVE_OUT + "--stage-epochs"),
    ("dmu", "--router-max-steps", "0", "--router-max-steps must be >= 1, got 0" + LEAVE_OUT + "--router-epochs"),
    ("dmu", "--stage-epochs", "0", "--stage-epochs must be > 0, got 0.0"),
    ("dmu", "--router-epochs", "-1", "--router-epochs must be > 0, got -1.0"),
    ("dmu", "--label-smoothing", "2", "--label-smoothing must be >= 0 and < 1, got 2.0"),
    ("dmu", "--checkpoint-every", "0", "--checkpoint-every must be >= 1, got 0"),
    ("dmu", "--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("dmu", "--weight-decay", "-1", "--weight-decay must be >= 0, got -1.0"),
    ("dmu", "--aux-loss-coef", "-1", "--aux-loss-coef must be >= 0, got -1.0"),
    ("dmu", "--logit-scale", "0", "--logit-scale must be > 0, got 0.0"),
    ("dmu", "--num-experts", "1", "--num-experts must be >= 2, got 1; " + DMU_NEEDS_TWO),
    ("dmu", "--clusters-per-modality", "0", "--clusters-per-modality must be >= 1, got 0"),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or reading the data is a failure here: the flags must be refused first."""
    import upcycle.recipes.dmu.pipeline as dmu
    import upcycle.train.command as command

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was read before the flags were checked")

    for module, name in ((command, "load_clip"), (command, "read_pairs"), (dmu, "load_dense_clip"),
                         (dmu, "read_pairs")):
        monkeypatch.setattr(module, name, refuse)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("flag, value, message", [row[1:] for row in BAD_FLAGS if row[0] == "train"],
                         ids=[f"{f}={v}" for c, f, v, _ in BAD_FLAGS if c == "train"])
def test_upcycle_train_refuses_a_nonsense_value_with_one_line_before_loading(flag, value, message, tmp_path, capsys,
                                                                               nothing_loads):
    out = tmp_path / "out"
    args = ["train", "--model", str(tmp_path / "model"), "--train-data", str(tmp_path / "pairs.json"), "--out",
            str(out), "--max-steps", "2", f"{flag}={value}"]
    assert main(args) == 2
    assert one_error_line(capsys) == f"error: {message}"
    assert not out.exists() and not (tmp_path / "out.train-work").exists()




@pytest.mark.parametrize("flag, value, message", [row[1:] for row in BAD_FLAGS if row[0] == "dmu"],
                         ids=[f"{f}={v}" for c, f, v, _ in BAD_FLAGS if c == "dmu"])
def test_upcycle_dmu_refuses_the_same_nonsense_under_its_flags(flag, value, message, tmp_path, capsys,
                                                               nothing_loads):
    out = tmp_path / "out"
    args = ["dmu", "--base", str(tmp_path / "base"), "--train-data", str(tmp_path / "pairs.json"), "--out", str(out),
            "--top-k", "1", f"{flag}={value}"]
    assert main(args) == 2
    assert one_error_line(capsys).startswith(f"error: {message}")
    assert not out.exists() and not (tmp_path / "out.dmu-work").exists()


@pytest.mark.parametrize("field, value, message", [
    ("grad_accum", 0, "--grad-accum must be >= 1, got 0"),
    ("grad_accum", 1.5, "--grad-accum must be a whole number, got 1.5"),
    ("max_steps", 0, "--max-steps must be >= 1, got 0"),
    ("epochs", 0.0, "--epochs must be > 0, got 0.0"),
    ("lr", float("inf"), "--lr must be a finite number, got inf"),
    ("max_grad_norm", 0.0, "--max-grad-norm must be > 0, got 0.0"),
    ("logit_scale", 0.0, "--logit-scale must be > 0, got 0.0"),
    ("label_smoothing", 1.0, "--label-smoothing must be >= 0 and < 1, got 1.0"),
    ("warmup_ratio", 1.5, "--warmup-ratio must be between 0 and 1, got 1.5"),
    ("trainable", "experts", "--trainable must be one of all, ffn, router, got 'experts'"),
    ("precision", "fp16", "--precision must be one of auto, fp32, bf16, got 'fp16'"),
    ("checkpoint_every", True, "--checkpoint-every must be a whole number, got True"),
])
def test_the_python_api_refuses_the_same_values(field, value, message):
    with pytest.raises(UserError) as refused:
        TrainConfig(**{field: value})
    assert str(refused.value).startswith(message)


def test_sensible_edge_values_are_accepted():
    cfg = TrainConfig(max_steps=1, epochs=0.01, warmup_ratio=1.0, label_smoothing=0.0, weight_decay=0.0,
                      aux_loss_coef=0.0, max_grad_norm=None, logit_scale=None, num_workers=0, seed=0)
    assert cfg.max_grad_norm is None and math.isclose(cfg.epochs, 0.01)
    DMUConfig(base="b", train_data="d", out="o", num_experts=2, logit_scale=None, stage_max_steps=1)


def test_a_dmu_config_cannot_be_changed_unchecked_after_it_was_made(tmp_path):
    # Configs are frozen and checked once, when made: a field cannot be set afterwards, and a changed copy
    # (dataclasses.replace) is a new config, checked like any other, so nonsense never reaches the run.
    cfg = DMUConfig(base=str(tmp_path / "base"), train_data="d", out=str(tmp_path / "out"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.router_lr = -1.0
    with pytest.raises(UserError, match="--router-lr must be > 0, got -1.0"):
        dataclasses.replace(cfg, router_lr=-1.0)
    assert cfg.router_lr == 1e-6


def test_a_train_config_cannot_be_changed_unchecked_after_it_was_made(base_clip_dir, grids_dir, tmp_path):
    from conftest import dataset_for

    from encoder.loading import load_clip

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(max_steps=2, batch_size=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grad_accum = 0
    with pytest.raises(UserError, match="--grad-accum must be >= 1, got 0"):
        ContrastiveTrainer(loaded.model, data, data.collate, dataclasses.replace(cfg, grad_accum=0), tmp_path / "w")
    assert not (tmp_path / "w").exists()


# -- non-finite weights: refused before the first step, trained or frozen, naming the tensor ---------------------

def poisoned_copy(base_clip_dir, tmp_path, pick):
    import shutil

    model = tmp_path / "poisoned"
    shutil.copytree(base_clip_dir, model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if pick(k))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model, name


@pytest.mark.parametrize("trainable, pick", [
    ("all", lambda k: "mlp.fc1.weight" in k),
    # --trainable ffn freezes the attention weights: a NaN there poisons the loss just the same
    ("ffn", lambda k: "self_attn.q_proj.weight" in k),
], ids=["trained", "frozen"])
def test_upcycle_train_refuses_a_model_with_a_nan_weight_before_the_first_step(trainable, pick, base_clip_dir,
                                                                                grids_dir, tmp_path, capsys):
    model, name = poisoned_copy(base_clip_dir, tmp_path, pick)
    out = tmp_path / "out"
    args = ["train", "--model", str(model), "--train-data", str(grids_dir / "train.json"), "--out", str(out),
            "--max-steps", "2", "--batch-size", "16", "--trainable", trainable]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"{model}: {name} holds 1 NaN or infinite value(s)" in line, line
    assert "--lr" not in line and "diverge" not in line
    assert not out.exists() and not (tmp_path / "out.train-work").exists()


def interrupt_after_two_steps(loaded, data, cfg, work, monkeypatch) -> None:
    """Train until the run is killed during its third optimizer step, as a user's Ctrl-C would."""
    real = kill_after_steps(monkeypatch, ContrastiveTrainer, 2)
    with pytest.raises(KeyboardInterrupt):
        ContrastiveTrainer(loaded.model, data, data.collate, cfg, work).train()
    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", real)


def test_a_checkpoint_with_a_nan_weight_is_named_on_resume(base_clip_dir, grids_dir, tmp_path, monkeypatch):
    from conftest import dataset_for

    from encoder.loading import load_clip
    from upcycle.train import latest_checkpoint

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(max_steps=3, batch_size=16, lr=1e-3, checkpoint_every=1)
    interrupt_after_two_steps(loaded, data, cfg, tmp_path / "w", monkeypatch)
    checkpoint = latest_checkpoint(tmp_path / "w")
    assert checkpoint.name == "step-2"
    tensors = load_file(checkpoint / "trainable.safetensors")
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, checkpoint / "trainable.safetensors")
    again = ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "w")
    with pytest.raises(NonFiniteValues, match=f"checkpoint {checkpoint}: {name} holds 1 NaN or infinite"):
        again.train()


def test_a_nan_loss_at_the_first_step_from_finite_weights_does_not_blame_the_learning_rate(
        base_clip_dir, grids_dir, tmp_path, monkeypatch):
    from conftest import dataset_for

    from encoder.loading import load_clip
    from upcycle.train import trainer as trainer_module

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    real = trainer_module.clip_contrastive_loss
    monkeypatch.setattr(trainer_module, "clip_contrastive_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    trainer = ContrastiveTrainer(loaded.model, data, data.collate, TrainConfig(max_steps=2, batch_size=16),
                                 tmp_path / "w", source="the base")
    with pytest.raises(TrainingDiverged) as stopped:
        trainer.train()
    message = str(stopped.value)
    assert "at step 1, before any update, from the finite weights of the base, so not because of the learning rate" \
        in message and "lower the" not in message, message
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_a_nan_loss_at_the_first_step_after_resuming_names_the_checkpoint_not_the_learning_rate(
        base_clip_dir, grids_dir, tmp_path, monkeypatch):
    from conftest import dataset_for

    from encoder.loading import load_clip
    from upcycle.train import trainer as trainer_module

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(max_steps=4, batch_size=16, lr=1e-3, checkpoint_every=2)
    interrupt_after_two_steps(loaded, data, cfg, tmp_path / "w", monkeypatch)
    loss = trainer_module.clip_contrastive_loss
    monkeypatch.setattr(trainer_module, "clip_contrastive_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged) as stopped:
        ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "w").train()
    message = str(stopped.value)
    assert f"at step 3, the first after resuming from {tmp_path / 'w' / 'step-2'}, before any update" in message
    assert "restart with a lower --lr" in message, message


# -- the LLaVA loop: the same refusal for a tower or language model with a NaN weight ---------------------------

@pytest.mark.parametrize("part", ["vision_tower", "model_name_or_path"])
def test_llava_training_refuses_a_frozen_nan_weight_before_the_first_step(part, tmp_path, digit_llm_dir,
                                                                          clip_moe_dir, grids_dir, capsys):
    import shutil

    from mllm_bridge.train.cli import main as train_main

    dirs = {"vision_tower": clip_moe_dir, "model_name_or_path": digit_llm_dir}
    poisoned = tmp_path / part
    shutil.copytree(dirs[part], poisoned)
    weights = load_file(poisoned / "model.safetensors")
    # layer 0 (the tower's text half and its last layer are not used by LLaVA: a NaN there changes no loss)
    name = next(k for k in weights if k.startswith(("vision_model.encoder.layers.0.mlp", "model.layers.0.mlp"))
                and k.endswith("weight"))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    dirs[part] = poisoned
    out = tmp_path / "llava-nan"
    argv = ["pretrain", "--model_name_or_path", str(dirs["model_name_or_path"]), "--vision_tower",
            str(dirs["vision_tower"]), "--data_path", str(grids_dir / "train.json"), "--image_folder", str(grids_dir),
            "--output_dir", str(out), "--per_device_train_batch_size", "8", "--max_steps", "2", "--report_to", "none",
            "--gradient_checkpointing", "False"]
    assert train_main(argv) == 2
    line = one_error_line(capsys)
    assert f"--{part} {poisoned}: " in line and "holds 1 NaN or infinite value(s)" in line, line
    assert "learning_rate" not in line and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("weight_decay", "-1", "--weight_decay -1.0: expected 0 or a positive number"),
    ("warmup_steps", "-5", "--warmup_steps -5: expected 0 or a positive number"),
    ("max_grad_norm", "-1", "--max_grad_norm -1.0: expected 0 or a positive number (0 turns clipping off)"),
    ("max_grad_norm", "nan", "--max_grad_norm nan: expected 0 or a positive number"),
    ("learning_rate", "inf", "--learning_rate inf: expected a finite positive number"),
])
def test_llava_flags_refuse_negative_or_non_finite_optimizer_settings(flag, value, message, tmp_path):
    from mllm_bridge.train.arguments import split_arguments
    from mllm_bridge.train.cli import build_parser

    argv = ["pretrain", "--model_name_or_path", "llm", "--vision_tower", "tower", "--data_path", "d.json",
            "--output_dir", str(tmp_path / "out"), f"--{flag}", value]
    with pytest.raises(UserError) as refused:
        split_arguments(build_parser().parse_args(argv))
    assert str(refused.value).startswith(message)
