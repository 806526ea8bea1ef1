"""Fault tier, the research harness's numbers (`upcycle compare`, `upcycle replicate`, `upcycle.eval.intervals`):
nothing reported surer than the data allows, no input silently repeated or dropped, one failing candidate or a
kill costing only itself (they used to: a bootstrap interval of [100, 100] from 50 hits, a paired difference on 3
items called "higher", `--seeds 0,0` reported as a replication with std 0, a tower missing from the MLLM table
without a word, one failing sweep candidate stopping the whole comparison, an arm killed near its end restarting
from step 0)."""

from __future__ import annotations

import pytest

from upcycle.cli import main


# --- seeds: repeats and junk are refused in one line before anything is written ------------------------------

@pytest.mark.parametrize("seeds, says", [("0,0", "seed 0 is given more than once"),
                                         ("0,1,1", "seed 1 is given more than once"),
                                         ("0,-1", "'-1' is not a seed"), ("0,1.5", "'1.5' is not a seed"),
                                         ("0,,1", "'' is not a seed"), ("a", "'a' is not a seed")])
def test_compare_refuses_repeated_or_junk_seeds(seeds, says, base_clip_dir, grids_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                 "--arms", "base,dense", "--seeds", seeds])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seeds" in err[0] and says in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("flag, seeds, says", [("--seeds", "0,0", "seed 0 is given more than once"),
                                               ("--mllm-seeds", "0,-2", "'-2' is not a seed"),
                                               ("--seeds", "1e3", "'1e3' is not a seed")])
def test_replicate_refuses_repeated_or_junk_seeds(flag, seeds, says, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["replicate", "--out", str(out), flag, seeds]
    if flag == "--seeds":
        args += ["--mllm-seeds", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and says in err[0], err
    assert not out.exists()


# --- compare's arms checkpoint, so a kill costs minutes, not the arm ------------------------------------------

@pytest.mark.slow
def test_a_compare_arm_killed_midway_resumes_from_its_checkpoint_to_the_same_weights(base_clip_dir, grids_dir,
                                                                                   tmp_path, monkeypatch):
    """12 steps (2 epochs of 96 pairs, batch 16), a checkpoint every 4, killed after step 6: the re-run trains
    steps 5-12 only, and its weights are the uninterrupted run's."""
    from conftest import kill_after_steps
    from safetensors.torch import load_file

    from upcycle.train import ContrastiveTrainer

    def compare(out):
        return main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                     "--arms", "dense", "--seeds", "0", "--num-experts", "2", "--batch-size", "16",
                     "--checkpoint-every", "4"])

    assert compare(tmp_path / "straight") == 0
    real = kill_after_steps(monkeypatch, ContrastiveTrainer, 6)
    with pytest.raises(KeyboardInterrupt):
        compare(tmp_path / "killed")
    trained = []

    def counted(self, batches):
        trained.append(self.step + 1)
        return real(self, batches)

    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", counted)
    assert compare(tmp_path / "killed") == 0
    assert trained == list(range(5, 13))  # from the step-4 checkpoint, not from step 0
    weights = [load_file(str(out / "arms" / "dense" / "seed-0" / "model" / "model.safetensors"))
               for out in (tmp_path / "straight", tmp_path / "killed")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert (weights[1][key] - value).abs().max() <= 1e-6, key


def test_dmu_arms_checkpoint_their_stages_and_router_training(tmp_path, monkeypatch):
    """DMU's stages and router training are the DMU recipe's own runs: the comparison's interval reaches them."""
    from upcycle.experiments.compare import arms

    seen = []

    def stop(cfg, resume=False):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(arms, "run_dmu", stop)
    with pytest.raises(KeyboardInterrupt):
        arms.train_arm("dmu", 0, tmp_path / "base", tmp_path / "train.json", tmp_path / "arm",
                       arms.ArmSettings(checkpoint_every=7))
    assert seen[0].checkpoint_every == 7
    assert arms.ArmSettings().checkpoint_every < 500  # the trainers' default never checkpoints an arm this size
