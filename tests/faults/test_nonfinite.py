"""Fault tier, non-finite numbers: a model with one NaN weight must never score (NaN compares False, so a
rank counted as `scores >= best` would make it perfect). Every metric refuses with one line, nothing written."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder.utils.errors import NonFiniteValues
from upcycle.embedded.digit_accuracy import position_accuracy
from upcycle.eval.retrieval import retrieval_metrics
from upcycle.eval.zero_shot import topk_accuracy
from encoder.routing_stats import RoutingTally


def unit(n, d=8, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_metric_refuses_non_finite_embeddings(bad):
    images, texts = unit(6), unit(6, seed=1)
    poisoned = images.clone()
    poisoned[2, 3] = bad
    captions = [f"c{i}" for i in range(6)]
    with pytest.raises(NonFiniteValues, match=r"image embeddings: 1 of 6 rows are NaN or infinite"):
        retrieval_metrics(poisoned, texts, captions)
    with pytest.raises(NonFiniteValues, match="text embeddings"):
        retrieval_metrics(images, poisoned, captions)
    with pytest.raises(NonFiniteValues, match="class"):
        topk_accuracy(images, poisoned[:3], [0, 1, 2, 0, 1, 2])
    with pytest.raises(NonFiniteValues, match="image embeddings"):
        position_accuracy(poisoned, torch.zeros(6, 1, dtype=torch.long), unit(10).view(1, 10, 8))


def test_finite_embeddings_still_score_and_identical_ones_score_nothing():
    images = unit(6)
    assert retrieval_metrics(images, images.clone(), [f"c{i}" for i in range(6)])["i2t_r1"] == 100.0
    collapsed = torch.ones(6, 8) / 8 ** 0.5
    assert retrieval_metrics(collapsed, collapsed, [f"c{i}" for i in range(6)])["i2t_r1"] == 0.0


def test_routing_tally_refuses_nan_router_logits():
    tally = RoutingTally([0, 1], num_experts=4, top_k=2)
    logits = torch.randn(5, 4)
    logits[1, 0] = float("nan")
    with pytest.raises(NonFiniteValues, match="router logits of MoE layer 1"):
        tally.add([torch.randn(5, 4), logits])


def poison_one_expert_weight(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if "experts.up_proj" in k and k.startswith("vision"))
    weights[name][0, 0, 0] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def nan_moe_dir(tmp_path_factory, base_clip_dir):
    from upcycle.cli import main as upcycle_main

    model = tmp_path_factory.mktemp("faults") / "nan-moe"
    assert upcycle_main(["sparse", "--base", str(base_clip_dir), "--out", str(model), "--num-experts", "2",
                         "--top-k", "1"]) == 0
    poison_one_expert_weight(model)
    return model


@pytest.mark.parametrize("command", ["eval", "routing"])
@pytest.mark.end_to_end
def test_eval_and_routing_on_a_model_with_one_nan_expert_weight_exit_non_zero_with_one_line(
        command, tmp_path, nan_moe_dir, grids_dir):
    model = nan_moe_dir
    out = tmp_path / "metrics.json"
    extra = ["--out", str(out)] if command == "eval" else ["--out-png", str(tmp_path / "r.png"), "--out-json",
                                                           str(out)]
    result = subprocess.run([sys.executable, "-m", "upcycle", command, "--model", str(model), "--data",
                             str(grids_dir / "test.json"), *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN or infinite" in lines[0], result.stderr[-1500:]
    assert not out.exists() and not (tmp_path / "r.png").exists()


def test_upcycling_a_base_with_a_nan_weight_is_refused_and_writes_nothing(tmp_path, capsys):
    from conftest import save_tiny_dense_clip

    from upcycle.cli import main as upcycle_main

    base = tmp_path / "nan-base"
    save_tiny_dense_clip(base)
    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if "mlp.fc1.weight" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "moe"
    assert upcycle_main(["sparse", "--base", str(base), "--out", str(out), "--num-experts", "2", "--top-k", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computes NaN or inf" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".moe.*"))


# -- the divergence stop: its advice must be one the resume accepts, and name the loss the ranks found -------------

def _lr_at(lr: float, steps: int, total: int) -> float:
    """The rate a fresh run at `lr` has after `steps` updates of `upcycle train`'s schedule (no warm-up here)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, total)
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return schedule.get_last_lr()[0]


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_the_advice_after_a_nan_loss_is_a_resume_that_is_accepted_and_recorded(base_clip_dir, grids_dir, tmp_path,
                                                                               monkeypatch, capsys):
    import json

    from upcycle.cli import main as upcycle_main
    from upcycle.train import trainer as trainer_module

    real, calls = trainer_module.clip_contrastive_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    work, out = tmp_path / "work", tmp_path / "trained"
    command = ["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"), "--out",
               str(out), "--work-dir", str(work), "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "1",
               "--warmup-ratio", "0"]
    monkeypatch.setattr(trainer_module, "clip_contrastive_loss", nan_at_step_3)
    assert upcycle_main([*command, "--lr", "1e-3"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and err[0] == (
        f"error: the loss became nan at step 3; the last good checkpoint is {work / 'step-2'}; to continue from it at "
        "a lower learning rate, run the same command again with --resume --resume-lower-lr and --lr below 1e-3; or "
        "remove the work directory and restart with a lower --lr"), err
    monkeypatch.undo()

    # A changed rate without the flag, and a higher one with it, are still refused, each in one line.
    assert upcycle_main([*command, "--lr", "5e-4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "(lr: 0.001 -> 0.0005) (a lower --lr is accepted with --resume-lower-lr)" in err, err
    assert upcycle_main([*command, "--lr", "2e-3", "--resume", "--resume-lower-lr"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "--resume-lower-lr resumes only with a lower --lr: 0.002 is above the 1e-3" in err[0]
    assert not out.exists()

    # The advice, followed: trains on from step 2 at the lower rate, as a run started at 5e-4 would at that step.
    assert upcycle_main([*command, "--lr", "5e-4", "--resume", "--resume-lower-lr"]) == 0
    assert out.is_dir()
    state = json.loads((work / "step-4" / "state.json").read_text())
    assert state["lr_lowered"] == [{"step": 2, "from": 1e-3, "to": 5e-4}] and state["config"]["lr"] == 5e-4
    lines = {row["step"]: row for row in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())}
    assert sorted(lines) == [1, 2, 3, 4]
    assert lines[3]["lr_lowered_from"] == 1e-3 and all("lr_lowered_from" not in lines[s] for s in (1, 2, 4))
    for step in (3, 4):
        assert lines[step]["lr"] == pytest.approx(_lr_at(5e-4, step, 4), rel=1e-9), step
    assert lines[2]["lr"] == pytest.approx(_lr_at(1e-3, 2, 4), rel=1e-9)


def test_a_llava_resume_with_a_lower_rate_needs_the_flag_and_is_recorded(tmp_path, digit_llm_dir, clip_moe_dir,
                                                                          grids_dir, monkeypatch, capsys):
    import json

    from mllm_bridge.train import loop
    from mllm_bridge.train.cli import main as llava_main

    out = tmp_path / "llava-nan"
    real_loss = loop.LlavaTrainer._loss

    def diverging(self, batch):
        loss = real_loss(self, batch)
        return loss * float("nan") if self.step == 3 else loss

    def command(lr, *extra):
        values = dict(model_name_or_path=digit_llm_dir, vision_tower=clip_moe_dir, data_path=grids_dir / "train.json",
                      image_folder=grids_dir, output_dir=out, per_device_train_batch_size=8, max_steps=5,
                      learning_rate=lr, gradient_checkpointing=False, save_steps=2, report_to="none", seed=0)
        return ["pretrain", *[item for k, v in values.items() for item in (f"--{k}", str(v))], *extra]

    monkeypatch.setattr(loop.LlavaTrainer, "_loss", diverging)
    assert llava_main(command(1e-2)) == 2
    err = capsys.readouterr().err
    assert (f"the last good checkpoint is {out / 'checkpoint-2'}; to continue from it at a lower learning rate, run "
            "the same command again with --resume_lower_lr True and --learning_rate below 0.01;") in err, err
    monkeypatch.undo()
    assert llava_main(command(5e-3)) == 2
    assert "(a lower --learning_rate is accepted with --resume_lower_lr)" in capsys.readouterr().err
    assert llava_main(command(2e-2, "--resume_lower_lr", "True")) == 2
    assert "--resume_lower_lr resumes only with a lower --learning_rate" in capsys.readouterr().err
    assert llava_main(command(5e-3, "--resume_lower_lr", "True")) == 0
    state = json.loads((loop.latest_checkpoint(out) / "trainer_state.json").read_text())  # one after the resume
    assert state["lr_lowered"] == [{"step": 2, "from": 1e-2, "to": 5e-3}]
    assert state["settings"]["--learning_rate"] == 5e-3
    lines = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert lines[3]["lr_lowered_from"] == 1e-2 and "lr_lowered_from" not in lines[4]


class _Rank:
    """What `_stop_or_sum` needs of an accelerator, for one of two ranks whose sum-reduce meets in threads."""

    def __init__(self, index, meeting):
        self.num_processes, self.process_index, self.device = 2, index, torch.device("cpu")
        self.meeting = meeting

    def reduce(self, tensor, reduction="sum"):
        sent, barrier = self.meeting
        sent[self.process_index] = tensor.clone()
        barrier.wait()
        total = sent[0] + sent[1]
        barrier.wait()
        return total


def test_every_rank_names_the_non_finite_loss_the_reduction_found_not_its_own(tmp_path):
    import threading

    from encoder.training.loop import CheckpointDir, TrainingLoop
    from encoder.utils.errors import TrainingDiverged

    meeting = ([None, None], threading.Barrier(2))
    messages = {}

    def rank(index, loss):
        loop = object.__new__(TrainingLoop)
        loop.accelerator, loop.checkpoints = _Rank(index, meeting), CheckpointDir(tmp_path, "step-", "state.json")
        loop.step = loop.first_step = 0
        loop.resumed_from, loop.source = None, "the start"
        try:
            loop._stop_or_sum(torch.tensor(loss), {"samples": 4.0})
        except TrainingDiverged as stop:
            messages[index] = str(stop)

    threads = [threading.Thread(target=rank, args=(0, 0.53)), threading.Thread(target=rank, args=(1, float("nan")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(messages) == {0, 1}, messages  # every rank stops, the one with a finite loss too
    assert messages[0] == messages[1]
    assert messages[0].startswith("the loss became nan on rank 1 of 2 at step 1, before any update"), messages[0]


def test_the_message_of_the_reduced_losses_names_each_kind_and_its_ranks():
    from encoder.training.loop import describe_non_finite, non_finite_kind

    assert [non_finite_kind(v) for v in (0.5, float("nan"), float("inf"), -float("inf"))] == [0, 1, 2, 3]
    assert describe_non_finite([1.0]) == "nan"
    assert describe_non_finite([3.0]) == "-inf"
    assert describe_non_finite([0.0, 1.0]) == "nan on rank 1 of 2"
    assert describe_non_finite([2.0, 1.0, 0.0, 2.0]) == "inf on ranks 0, 3 and nan on rank 1 of 4"
