"""Fault tier, changed settings on a LLaVA resume: `python -m mllm_bridge.train` continues a checkpoint only with
the flags that made it. It used to refuse a new --vision_tower but silently keep the checkpoint's learning rate,
schedule, warm-up, select layer, image folder, ... under the new flags; now every flag that shapes the result is
compared and all differences are named in one line, before the language model is loaded."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from encoder.utils.step_record import SettingsChanged
from mllm_bridge.train import loop
from mllm_bridge.train import run as run_module
from mllm_bridge.train.arguments import NOT_SHAPING, split_arguments
from mllm_bridge.train.cli import build_parser, main

STEPS, SAVE_STEPS = 4, 2


def flags(llm, tower, data, out, **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / "train.json", image_folder=data,
                  output_dir=out, per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-2,
                  gradient_checkpointing=False, save_steps=SAVE_STEPS, report_to="none", seed=0)
    values.update(extra)
    return ["pretrain", *[item for key, value in values.items() for item in (f"--{key}", str(value))]]


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, digit_llm_dir, clip_moe_dir, grids_dir):
    """A stage-1 run of 4 steps killed after step 3: checkpoint-2 is its newest checkpoint, no output yet."""
    root = tmp_path_factory.mktemp("llava-resume")
    out = root / "llava-interrupted"
    base = dict(llm=digit_llm_dir, tower=clip_moe_dir, data=grids_dir)
    real = loop.LlavaTrainer._optimizer_step

    def killed(self, batches):
        if self.step == SAVE_STEPS + 1:
            raise KeyboardInterrupt
        return real(self, batches)

    loop.LlavaTrainer._optimizer_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            main(flags(**base, out=out))
    finally:
        loop.LlavaTrainer._optimizer_step = real
    assert [p.name for p in loop.checkpoints(out)] == [f"checkpoint-{SAVE_STEPS}"]
    # The same images and the same tower under other paths: only the flag differs.
    other_images, other_tower = root / "grids-copy", root / "tower-copy"
    shutil.copytree(grids_dir, other_images)
    shutil.copytree(clip_moe_dir, other_tower)
    return SimpleNamespace(out=out, base=base, checkpoint=out / f"checkpoint-{SAVE_STEPS}",
                           other_images=other_images, other_tower=other_tower)


@pytest.fixture
def no_model_loads(monkeypatch):
    """A refused resume must stop before the language model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint's settings were compared")

    monkeypatch.setattr(run_module, "build_training_model", refuse)


def files_of(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


CHANGES = [  # flag, new value, the difference named (the run's values: see `flags` and stage 1's defaults)
    ("learning_rate", "0.1", "--learning_rate: 0.01 -> 0.1"),
    ("lr_scheduler_type", "linear", "--lr_scheduler_type: cosine -> linear"),
    ("warmup_ratio", "0.5", "--warmup_ratio: 0.03 -> 0.5"),
    ("warmup_steps", "1", "--warmup_steps: 0 -> 1"),
    ("weight_decay", "0.1", "--weight_decay: 0.0 -> 0.1"),
    ("mm_vision_select_layer", "-1", "--mm_vision_select_layer: -2 -> -1"),
    ("model_max_length", "1024", "--model_max_length: 2048 -> 1024"),
    ("mm_projector_type", "linear", "--mm_projector_type: mlp2x_gelu -> linear"),
    ("tune_mm_mlp_adapter", "False", "--tune_mm_mlp_adapter: True -> False"),
    ("freeze_backbone", "True", "--freeze_backbone: False -> True"),
    ("max_steps", "6", "--max_steps: 4 -> 6"),
    ("num_train_epochs", "2", "--num_train_epochs: 1.0 -> 2.0"),
    ("image_aspect_ratio", "pad", "--image_aspect_ratio: square -> pad"),
    ("max_grad_norm", "0.5", "--max_grad_norm: 1.0 -> 0.5"),
    ("seed", "1", "--seed: 0 -> 1"),
    ("per_device_train_batch_size", "4", "--per_device_train_batch_size: 8 -> 4"),
    ("group_by_modality_length", "True", "--group_by_modality_length: False -> True"),
    ("image_folder", "OTHER_IMAGES", "--image_folder: GRIDS -> OTHER_IMAGES"),
    ("vision_tower", "OTHER_TOWER", "--vision_tower: TOWER -> OTHER_TOWER"),
]


def _paths(text: str, interrupted) -> str:
    return (text.replace("OTHER_IMAGES", str(interrupted.other_images))
            .replace("OTHER_TOWER", str(interrupted.other_tower))
            .replace("GRIDS", str(interrupted.base["data"])).replace("TOWER", str(interrupted.base["tower"])))


@pytest.mark.parametrize("flag, value, named", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_resume_with_a_changed_flag_is_refused_in_one_line_naming_it(flag, value, named, interrupted, capsys,
                                                                       no_model_loads):
    value, named = _paths(value, interrupted), _paths(named, interrupted)
    before = files_of(interrupted.out)
    capsys.readouterr()
    assert exit_status(flags(**interrupted.base, out=interrupted.out, **{flag: value})) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1, lines
    assert f"{interrupted.checkpoint} belongs to a run with other settings ({named})" in lines[0], lines[0]
    assert "--overwrite_output_dir True" in lines[0]
    assert files_of(interrupted.out) == before


def test_every_changed_flag_is_named_with_its_old_and_new_value(interrupted, no_model_loads):
    argv = flags(**interrupted.base, out=interrupted.out, learning_rate=0.5, lr_scheduler_type="constant",
                 warmup_ratio=0.0, model_max_length=512, logging_steps=3)
    with pytest.raises(SettingsChanged) as refused:
        run_module.prepare_run(split_arguments(build_parser().parse_args(argv)))
    message = str(refused.value)
    assert ("(--learning_rate: 0.01 -> 0.5; --lr_scheduler_type: cosine -> constant; --model_max_length: 2048 -> "
            "512; --warmup_ratio: 0.03 -> 0.0)") in message, message
    assert "logging_steps" not in message


def test_only_the_listed_flags_are_free_to_change():
    # A flag added to the argument classes is compared unless it is listed, with a reason, as not shaping.
    assert NOT_SHAPING == {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "cache_dir", "save_strategy", "save_steps",
        "save_total_limit", "logging_steps", "logging_dir", "report_to", "dataloader_num_workers",
        "gradient_checkpointing", "evaluation_strategy", "eval_strategy", "per_device_eval_batch_size",
        "lazy_preprocess", "is_multimodal", "remove_unused_columns", "local_rank",
        "resume_lower_lr",  # it frees --learning_rate to go lower only, checked on its own (test_nonfinite.py)
        "deepspeed"}  # the config's path: its content is compared instead, where it is used (test_deepspeed_runs.py)


def test_a_resume_with_only_non_shaping_changes_continues(interrupted, tmp_path, capsys):
    out = tmp_path / "llava-moved"  # another --output_dir too: the checkpoint is compared, not where it lies
    shutil.copytree(interrupted.out, out)
    argv = flags(**interrupted.base, out=out, logging_steps=2, save_total_limit=2, dataloader_num_workers=0,
                 gradient_checkpointing=True, report_to="tensorboard")
    capsys.readouterr()
    assert main(argv) == 0
    assert f"resumed from {out / f'checkpoint-{SAVE_STEPS}'} (step {SAVE_STEPS} of {STEPS})" in capsys.readouterr().out
    assert (out / "mm_projector.bin").is_file() and (out / "config.json").is_file()


# -- checkpoints written before the settings were recorded --------------------------------------------------

def as_older_version(checkpoint, tmp_path):
    """A copy of the run whose checkpoint has the older trainer_state.json (a few settings in "identity")."""
    out = tmp_path / "llava-older"
    shutil.copytree(checkpoint.parent, out)
    state_file = out / checkpoint.name / loop.STATE_FILE
    state = json.loads(state_file.read_text())
    settings = state.pop("settings")
    state["identity"] = {"output": "projector", "model_name_or_path": settings["--model_name_or_path"],
                         "vision_tower": settings["--vision_tower"], "data_path": settings["--data_path"],
                         "version": "plain", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                         "num_processes": 1, "total_steps": STEPS, "seed": 0}
    state_file.write_text(json.dumps(state))
    return out


def test_an_older_checkpoint_is_compared_through_its_recorded_flags(interrupted, tmp_path, capsys, monkeypatch):
    out = as_older_version(interrupted.checkpoint, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(run_module, "build_training_model", lambda *a, **k: pytest.fail("built the model"))
        assert exit_status(flags(**interrupted.base, out=out, warmup_ratio=0.2)) == 2
        assert "(--warmup_ratio: 0.03 -> 0.2)" in capsys.readouterr().err
    assert main(flags(**interrupted.base, out=out)) == 0  # the same flags: it resumes
    assert f"resumed from {out / f'checkpoint-{SAVE_STEPS}'}" in capsys.readouterr().out


def test_an_older_checkpoint_without_its_flags_is_refused_clearly(interrupted, tmp_path, capsys, no_model_loads):
    out = as_older_version(interrupted.checkpoint, tmp_path)
    (out / interrupted.checkpoint.name / loop.ARGS_FILE).unlink()
    assert exit_status(flags(**interrupted.base, out=out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records neither its settings nor its flags" in err[0], err
    assert "--overwrite_output_dir True" in err[0]


def test_a_flag_the_older_checkpoint_did_not_record_is_named_unset(interrupted, tmp_path, capsys, no_model_loads):
    out = as_older_version(interrupted.checkpoint, tmp_path)
    args_file = out / interrupted.checkpoint.name / loop.ARGS_FILE
    recorded = json.loads(args_file.read_text())
    del recorded["training"]["group_by_modality_length"]
    args_file.write_text(json.dumps(recorded))
    assert exit_status(flags(**interrupted.base, out=out)) == 2
    err = capsys.readouterr().err
    assert "(--group_by_modality_length: (unset) -> False)" in err and "did not record" in err, err


def test_a_checkpoint_from_before_image_grid_pinpoints_resumes_without_it(interrupted, tmp_path, capsys, monkeypatch):
    # --image_grid_pinpoints came with anyres: every run before it had none, so its absence is that value, not a
    # change; giving pinpoints on resume is one.
    out = tmp_path / "llava-before-pinpoints"
    shutil.copytree(interrupted.checkpoint.parent, out)
    state_file = out / interrupted.checkpoint.name / loop.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["settings"].pop("--image_grid_pinpoints") is None
    state_file.write_text(json.dumps(state))
    with monkeypatch.context() as patched:
        patched.setattr(run_module, "build_training_model", lambda *a, **k: pytest.fail("built the model"))
        assert exit_status(flags(**interrupted.base, out=out, image_grid_pinpoints="[[32, 64]]")) == 2
        assert "(--image_grid_pinpoints: None -> [[32, 64]])" in capsys.readouterr().err
    assert main(flags(**interrupted.base, out=out)) == 0
    assert f"resumed from {out / f'checkpoint-{SAVE_STEPS}'}" in capsys.readouterr().out


def test_a_frozen_tower_run_resumed_with_the_tower_training_is_refused_naming_it(interrupted, capsys, no_model_loads):
    # Stage 1 refuses --unfreeze_mm_vision_tower (its output would drop the tower); LLaVA-NeXT's spelling of a
    # tower-and-projector run passes the flag checks and meets the checkpoint's.
    before = files_of(interrupted.out)
    capsys.readouterr()
    argv = flags(**interrupted.base, out=interrupted.out, mm_tunable_parts="mm_vision_tower,mm_mlp_adapter")
    assert exit_status(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1, lines
    assert f"{interrupted.checkpoint} belongs to a run with other settings (" in lines[0]
    assert "--unfreeze_mm_vision_tower: False -> True" in lines[0], lines[0]
    assert "--mm_tunable_parts: None -> mm_vision_tower,mm_mlp_adapter" in lines[0], lines[0]
    assert files_of(interrupted.out) == before


def test_tower_flags_on_a_checkpoint_from_before_them_are_named_as_changes(interrupted, tmp_path, capsys,
                                                                           no_model_loads):
    out = tmp_path / "llava-before-tower-flags"
    shutil.copytree(interrupted.checkpoint.parent, out)
    state_file = out / interrupted.checkpoint.name / loop.STATE_FILE
    state = json.loads(state_file.read_text())
    for flag in ("--unfreeze_mm_vision_tower", "--mm_tunable_parts", "--mm_vision_tower_lr", "--balance_loss_coef",
                 "--router_z_loss_coef"):
        state["settings"].pop(flag)
    state_file.write_text(json.dumps(state))
    assert exit_status(flags(**interrupted.base, out=out, mm_tunable_parts="mm_vision_tower,mm_mlp_adapter")) == 2
    assert "--unfreeze_mm_vision_tower: False -> True" in capsys.readouterr().err

