"""Fault tier, changed settings: a step folder is reused only for the settings that made it."""

import json

import pytest
from conftest import kill_after_steps

from encoder.utils.errors import UserError
from encoder.utils.step_record import SETTINGS_FILE, SettingsChanged, claim, differences


def test_a_folder_is_claimed_once_and_reused_only_for_equal_settings(tmp_path):
    folder = tmp_path / "arm"
    settings = {"lr": 1e-4, "layers": (0, 2), "arm": "dense"}
    assert claim(folder, settings, "use another --out") is False
    assert json.loads((folder / SETTINGS_FILE).read_text())["layers"] == [0, 2]
    assert claim(folder, dict(settings), "use another --out") is True  # tuples and lists compare equal
    with pytest.raises(SettingsChanged, match=r"other settings \(lr: 0.0001 -> 0.1\); use another --out"):
        claim(folder, {**settings, "lr": 0.1}, "use another --out")
    with pytest.raises(SettingsChanged, match=r"extra: \(unset\) -> 1"):
        claim(folder, {**settings, "extra": 1}, "fix")


def test_a_folder_with_work_but_no_record_is_not_taken_for_ours(tmp_path):
    folder = tmp_path / "arm"
    folder.mkdir()
    (folder / "checkpoint-1").mkdir()
    with pytest.raises(SettingsChanged, match="settings are not recorded"):
        claim(folder, {"lr": 1}, "delete it")
    (folder / "checkpoint-1").rmdir()
    assert claim(folder, {"lr": 1}, "delete it") is False  # an empty folder is free


def test_an_unreadable_record_is_one_line(tmp_path):
    folder = tmp_path / "arm"
    folder.mkdir()
    (folder / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(UserError, match="is unreadable"):
        claim(folder, {"lr": 1}, "fix")


def test_differences_name_every_changed_setting_in_order():
    assert differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == [
        "b: 2 -> 5", "c: 3 -> (unset)", "d: (unset) -> 4"]


# -- `upcycle train` / the contrastive trainer: a resume refuses settings that would change the result -------

def crash_after_two_steps(monkeypatch, steps: int = 2):
    """Make training stop (as a kill would) once `steps` optimizer steps are done; returns the real step."""
    from upcycle.train import ContrastiveTrainer

    return kill_after_steps(monkeypatch, ContrastiveTrainer, steps)


@pytest.mark.parametrize("change, named", [
    (dict(lr=0.1), "lr: 0.001 -> 0.1"),
    (dict(trainable="ffn"), "trainable: all -> ffn"),
    (dict(max_steps=9), "max_steps: 4 -> 9"),
    (dict(identity={"model": "another"}), "model: base -> another"),
])
def test_a_trainer_resume_with_changed_settings_is_refused_naming_them(change, named, base_clip_dir, grids_dir,
                                                                        tmp_path, monkeypatch):
    from conftest import dataset_for

    from encoder.loading import load_clip
    from upcycle.train import ContrastiveTrainer, TrainConfig

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    settings = dict(trainable="all", max_steps=4, batch_size=16, lr=1e-3, checkpoint_every=1)
    real = crash_after_two_steps(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ContrastiveTrainer(loaded.model, data, data.collate, TrainConfig(**settings), tmp_path / "w",
                           identity={"model": "base"}).train()
    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", real)
    identity = change.pop("identity", {"model": "base"})
    resumed = ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate,
                                 TrainConfig(**{**settings, **change, "checkpoint_every": 3}), tmp_path / "w",
                                 identity=identity)
    with pytest.raises(SettingsChanged, match="other settings") as refused:
        resumed.train(resume=True)
    assert named in str(refused.value) and "checkpoint_every" not in str(refused.value)


def test_upcycle_train_resume_with_another_lr_is_one_line(base_clip_dir, grids_dir, tmp_path, monkeypatch, capsys):
    from upcycle.cli import main

    args = ["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"), "--out",
            str(tmp_path / "out"), "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "1"]
    crash_after_two_steps(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--resume", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr: 1e-05 -> 0.1" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_logs_every_step_once(base_clip_dir, grids_dir, tmp_path, monkeypatch):
    """The interrupted run logged step 3 after its step-2 checkpoint; the resumed run logs it again: once in all."""
    from conftest import dataset_for

    from encoder.loading import load_clip
    from upcycle.train import ContrastiveTrainer, TrainConfig

    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(trainable="all", max_steps=5, batch_size=16, lr=1e-3, checkpoint_every=2)
    real = crash_after_two_steps(monkeypatch, steps=3)
    with pytest.raises(KeyboardInterrupt):
        ContrastiveTrainer(loaded.model, data, data.collate, cfg, tmp_path / "w").train()
    metrics = tmp_path / "w" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 1.')  # a line cut by the kill
    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", real)
    ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "w").train(resume=True)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
