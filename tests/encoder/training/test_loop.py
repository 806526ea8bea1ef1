"""The loop core on a toy linear regression: accumulation, exact resume, pruning, the divergence stop, the
settings refusal. The two trainers' own tests cover the same through CLIP and LLaVA; these pin the core alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kill_after_steps
from safetensors.torch import load_file, save_file
from torch import nn

from encoder.loading import NonFiniteValues, require_finite_weights
from encoder.training import ClusterBatchSampler, make_accelerator
from encoder.training.loop import CheckpointDir, LoopPlan, TrainingLoop, adamw, refuse_changed_settings
from encoder.utils.errors import TrainingDiverged
from encoder.utils.step_record import SettingsChanged

SAMPLES = 12


class Toy(TrainingLoop):
    """y = x @ w + b fitted by MSE; a sample whose index is in `poisoned` gets a NaN target."""

    lr_flag = "--toy-lr"
    suspects = "the toy data"
    unstable_fix = "restart with a lower --toy-lr"

    def __init__(self, work: Path, batch: int = 4, accumulation: int = 1, steps: int = 5, save_every: int = 2,
                 limit: int | None = 1, lr: float = 0.05, poisoned: tuple[int, ...] = (), dropout: float = 0.0,
                 seed: int = 0):
        acc = make_accelerator("no", gradient_accumulation_steps=accumulation)
        torch.manual_seed(0)
        linear = nn.Linear(3, 1)
        x = torch.randn(SAMPLES, 3)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
        y[list(poisoned)] = float("nan")
        data = [{"x": x[i], "y": y[i]} for i in range(SAMPLES)]
        self.lr = lr
        model = nn.Sequential(nn.Dropout(dropout), linear)
        optimizer = adamw(list(model.parameters()), lr, 0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        sampler = ClusterBatchSampler([0] * SAMPLES, batch, acc.num_processes, acc.process_index, seed=1)
        plan = LoopPlan(total_steps=steps, accumulation=accumulation, max_grad_norm=1.0, save_every=save_every,
                        save_total_limit=limit, log_every=1, desc="toy", seed=seed, log_dir=work / "tb", report_to=["none"])
        super().__init__(acc, model, optimizer, scheduler, data, sampler, _collate, 0,
                         plan, CheckpointDir(work, "step-", "state.json"), "the toy start")
        self.linear = linear

    def _forward(self, batch):
        loss = nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        return loss, {"samples": float(len(batch["x"]))}

    def _step_metrics(self, micro):
        return {"loss": sum(m["loss"] for m in micro) / len(micro)}

    def _write_trained(self, directory, weights):
        # `weights` is the whole model's state dict: the Sequential's "1." is the linear layer.
        save_file({k[len("1."):]: v.contiguous() for k, v in weights.items()}, str(directory / "w.safetensors"))

    def _read_trained(self, directory):
        self.linear.load_state_dict(load_file(str(directory / "w.safetensors")))

    def _record(self):
        return {"settings": {"lr": self.lr}}

    def _refuse_changed_settings(self, path):
        recorded = json.loads((path / "state.json").read_text())["settings"]
        refuse_changed_settings(path, recorded, {"lr": self.lr}, "resume with the same --toy-lr")

    def _require_finite_weights(self):
        require_finite_weights(self.linear, self.source)


def _collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def _crash_at(monkeypatch, step: int) -> None:
    kill_after_steps(monkeypatch, Toy, step)


def test_accumulated_micro_batches_step_like_one_big_batch(tmp_path):
    # One epoch (12 samples) per optimizer step either way: 3 micro-batches of 4 or one batch of 12.
    micro = Toy(tmp_path / "micro", batch=4, accumulation=3, steps=3, save_every=0)
    micro.run()
    big = Toy(tmp_path / "big", batch=12, accumulation=1, steps=3, save_every=0)
    big.run()
    start = Toy(tmp_path / "start", steps=1).linear
    assert not torch.allclose(micro.linear.weight, start.weight)
    for a, b in zip(micro.linear.parameters(), big.linear.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    assert micro.batches_done == 9 and big.batches_done == 3


def test_a_killed_run_resumes_bit_exactly_and_logs_every_step_once(tmp_path, monkeypatch):
    straight = Toy(tmp_path / "a", accumulation=2)
    straight.run()
    _crash_at(monkeypatch, 3)  # after the checkpoint at step 2, with step 3 done but not saved
    with pytest.raises(KeyboardInterrupt):
        Toy(tmp_path / "b", accumulation=2).run()
    monkeypatch.undo()
    resumed = Toy(tmp_path / "b", accumulation=2)
    resumed.run(resumed.checkpoints.latest())
    assert resumed.first_step == 2 and resumed.batches_done == straight.batches_done == 10
    for a, b in zip(straight.linear.parameters(), resumed.linear.parameters()):
        assert torch.equal(a, b)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == straight.optimizer.state_dict()["state"][0]["step"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_dropout_draws_the_same_numbers_after_a_resume(tmp_path, monkeypatch):
    straight = Toy(tmp_path / "a", dropout=0.5)
    straight.run()
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Toy(tmp_path / "b", dropout=0.5).run()
    monkeypatch.undo()
    resumed = Toy(tmp_path / "b", dropout=0.5)
    resumed.run(resumed.checkpoints.latest())
    other_seed = Toy(tmp_path / "c", dropout=0.5, seed=1)
    other_seed.run()
    assert torch.equal(straight.linear.weight, resumed.linear.weight)
    assert not torch.equal(straight.linear.weight, other_seed.linear.weight)  # the masks did depend on the seed


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    Toy(tmp_path / "w", steps=5, save_every=1, limit=2).run()
    assert [p.name for p in CheckpointDir(tmp_path / "w", "step-", "state.json").all()] == ["step-3", "step-4"]
    Toy(tmp_path / "all", steps=3, save_every=1, limit=None).run()
    assert [p.name for p in CheckpointDir(tmp_path / "all", "step-", "state.json").all()] == ["step-1", "step-2"]


def test_a_nan_loss_before_any_update_blames_the_data_not_the_learning_rate(tmp_path):
    toy = Toy(tmp_path / "w", batch=SAMPLES, poisoned=(0,))
    with pytest.raises(TrainingDiverged) as stopped:
        toy.run()
    message = str(stopped.value)
    assert ("the loss became nan at step 1, before any update, from the finite weights of the toy start, so not "
            "because of the learning rate: check the toy data; no checkpoint was written yet") == message
    assert toy.step == 0 and all(torch.isfinite(p).all() for p in toy.linear.parameters())


def test_a_nan_loss_after_updates_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = Toy._forward

    def nan_at_step_4(self, batch):
        loss, numbers = real(self, batch)
        return (loss * float("nan") if self.step == 3 else loss), numbers

    monkeypatch.setattr(Toy, "_forward", nan_at_step_4)
    with pytest.raises(TrainingDiverged, match=r"^the loss became nan at step 4; the last good checkpoint is "
                                               r".*step-2; restart with a lower --toy-lr$"):
        Toy(tmp_path / "w").run()
    # Resumed from step-2 the loss is finite again until step 4, which is then two updates after the resume.
    toy = Toy(tmp_path / "w")
    with pytest.raises(TrainingDiverged, match="at step 4; the last good checkpoint"):
        toy.run(toy.checkpoints.latest())


def test_a_nan_loss_right_after_a_resume_suspects_the_data_or_the_checkpoint(tmp_path, monkeypatch):
    real = Toy._forward

    def nan_from_step_3(self, batch):
        loss, numbers = real(self, batch)
        return (loss * float("nan") if self.step >= 2 and self.resumed_from else loss), numbers

    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Toy(tmp_path / "w").run()
    monkeypatch.undo()
    monkeypatch.setattr(Toy, "_forward", nan_from_step_3)
    toy = Toy(tmp_path / "w")
    with pytest.raises(TrainingDiverged) as stopped:
        toy.run(toy.checkpoints.latest())
    message = str(stopped.value)
    assert f"at step 3, the first after resuming from {tmp_path / 'w' / 'step-2'}, before any update" in message
    assert message.endswith("(too high a --toy-lr before it): restart with a lower --toy-lr"), message


def test_non_finite_start_weights_are_refused_before_the_first_step(tmp_path):
    toy = Toy(tmp_path / "w")
    with torch.no_grad():
        toy.linear.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteValues, match="^the toy start: bias holds 1 NaN or infinite"):
        toy.run()
    assert toy.step == 0 and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, monkeypatch):
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Toy(tmp_path / "w", lr=0.05).run()
    monkeypatch.undo()
    toy = Toy(tmp_path / "w", lr=0.1)
    with pytest.raises(SettingsChanged, match=r"step-2 belongs to a run with other settings \(lr: 0.05 -> 0.1\); "
                                              "resume with the same --toy-lr$"):
        toy.run(toy.checkpoints.latest())
    assert toy.step == 0
