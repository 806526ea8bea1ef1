"""The training loop of both LLaVA stages, on accelerate: one CPU process, or DDP over GPUs / CPU processes.

Order per optimizer step: micro-batches under `accelerator.accumulate` (loss -> divergence check ->
backward), clip, optimizer and schedule step, log, checkpoint. Batches come from a one-cluster
`ClusterBatchSampler` (plain shuffles), or with `--group_by_modality_length True` from LLaVA's modality- and
length-grouped plan (`sampler.ModalityLengthBatchSampler`): either way every global batch (per-device batch x
processes) is planned from the seed and the epoch, the same on every rank, and split into equal shares, so a
resumed run sees exactly the batches an uninterrupted run sees.

Checkpoints (`OUTPUT_DIR/checkpoint-N/`, written atomically, the newest `--save_total_limit` kept) hold the
run's output files (usable as they are, e.g. as a stage-2 `--pretrain_mm_mlp_adapter`), the optimizer and
schedule, the flags and the loop's position.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from encoder.loading import require_finite_weights
from encoder.training import ClusterBatchSampler, endless_batches
from encoder.training.run_log import NullLog, RunLog
from encoder.utils.errors import TrainingDiverged, UserError
from encoder.utils.files import atomic_output_dir
from encoder.utils.step_record import SettingsChanged, differences

from .arguments import LlavaArguments, shaping_settings
from .data import modality_lengths
from .model_setup import TrainingModel
from .outputs import FullOutput, ProjectorOutput, publish
from .sampler import ModalityLengthBatchSampler

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_FILE = "optimizer.pt"
ARGS_FILE = "training_args.json"
LOSS_WINDOW = 10  # steps averaged for the start and end loss of the summary
TOWER_PART, PROJECTOR_PART = ".vision_tower.", ".mm_projector."  # in the names of the tower's / projector's weights


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


# What a run derives from its flags, its data and its launch that must also match on resume (the flags
# themselves are compared through `shaping_settings`). TOTAL_STEPS is known only once the data is tokenized.
NUM_PROCESSES, TOTAL_STEPS = "num_processes", "total_steps"


def run_settings(args: LlavaArguments, num_processes: int, total_steps: int | None = None) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (without total_steps when it is not known yet)."""
    settings = {**shaping_settings(args.as_dict()), NUM_PROCESSES: num_processes}
    if total_steps is not None:
        settings[TOTAL_STEPS] = total_steps
    return settings


def recorded_settings(path: Path) -> dict[str, Any]:
    """The settings `path` (a checkpoint-N directory) was made with.

    Checkpoints record them in trainer_state.json; older ones recorded a few in its "identity" and every flag in
    training_args.json, which is read instead (flags that version did not have then show as unset)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a complete checkpoint ({err}); pass a checkpoint-N directory") from None
    if "settings" in state:
        return state["settings"]
    try:
        flags = json.loads((path / ARGS_FILE).read_text())
        settings = shaping_settings(flags)
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path} records neither its settings nor its flags ({ARGS_FILE}: {err}), so a resume "
                        "cannot be checked against it; pass --overwrite_output_dir True to start afresh") from None
    identity = state.get("identity", {})
    return {**settings, **{key: identity[key] for key in (NUM_PROCESSES, TOTAL_STEPS) if key in identity}}


def refuse_changed_settings(path: Path, wanted: dict[str, Any]) -> None:
    """Raise SettingsChanged naming every setting in which `path` differs from `wanted` (old -> new), in one line.

    Settings `wanted` leaves out (total_steps, before the data is tokenized) are not compared."""
    recorded = {k: v for k, v in recorded_settings(path).items() if k in wanted or k != TOTAL_STEPS}
    changed = differences(recorded, wanted)
    if not changed:
        return
    why = "; (unset) marks what the older version that wrote it did not record" if set(wanted) - set(recorded) else ""
    raise SettingsChanged(f"{path} belongs to a run with other settings ({'; '.join(changed)}){why}; resume with "
                          "the same flags, or pass --overwrite_output_dir True to start afresh")


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    truncated: int  # samples cut to --model_max_length (each time one was drawn)
    empty_batches: int  # micro-batches with no target token left (they add nothing to the loss)
    start_loss: float  # mean over the first `loss_window` steps
    end_loss: float  # mean over the last `loss_window` steps
    loss_window: int  # LOSS_WINDOW, or half the steps on shorter runs


class LlavaTrainer:
    """Trains `trained.model` in place on `dataset`; `output` decides what checkpoints and the final output hold."""

    def __init__(self, accelerator, trained: TrainingModel, dataset: Dataset, collate, args: LlavaArguments,
                 output: ProjectorOutput | FullOutput):
        acc, t = accelerator, args.training
        self.accelerator, self.args, self.output, self.trained = acc, args, output, trained
        self.output_dir = Path(t.output_dir)
        processes = acc.num_processes
        if t.group_by_modality_length:
            self.sampler = ModalityLengthBatchSampler(modality_lengths(dataset.samples), t.per_device_train_batch_size,
                                                      processes, acc.process_index, t.seed,
                                                      accumulation=t.gradient_accumulation_steps)
        else:
            self.sampler = ClusterBatchSampler([0] * len(dataset), t.per_device_train_batch_size * processes,
                                               processes, acc.process_index, t.seed)
        if self.sampler.batches_per_epoch == 0:
            raise UserError(f"{len(dataset)} samples cannot be shared by {processes} processes; add data")
        workers = t.dataloader_num_workers
        if workers is None:
            workers = 4 if acc.device.type == "cuda" else 0
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                                 pin_memory=acc.device.type == "cuda")
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // t.gradient_accumulation_steps)
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs *
                                                                               self.steps_per_epoch))
        model = trained.model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
             {"params": [p for p in self.trainable if p.ndim < 2], "weight_decay": 0.0}], lr=t.learning_rate)
        from transformers import get_scheduler

        warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * self.total_steps)
        # Not prepared: accelerate would step a prepared schedule once per process.
        self.scheduler = get_scheduler(t.lr_scheduler_type, optimizer, warmup, self.total_steps)
        _fill_deepspeed_batch_size(acc, t.per_device_train_batch_size)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.batches_done = 0  # global micro-batches consumed, over all epochs
        self.samples_seen = 0
        self.truncated = 0
        self.empty_batches = 0
        self.first_losses: list[float] = []
        self.last_losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.resumed_from: Path | None = None
        self.first_step = 0  # the step this process started from (it made no update before)

    # -- checkpoints -------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it: every flag that shapes the result,
        the number of processes and the number of optimizer steps (which the data decides too)."""
        return run_settings(self.args, self.accelerator.num_processes, self.total_steps)

    def save_checkpoint(self) -> Path:
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        acc = self.accelerator
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            state = {"step": self.step, "batches_done": self.batches_done, "samples_seen": self.samples_seen,
                     "truncated": self.truncated, "empty_batches": self.empty_batches,
                     "first_losses": self.first_losses, "last_losses": list(self.last_losses),
                     "settings": self.settings()}
            with atomic_output_dir(path, overwrite=True) as tmp:
                self.output.write(model, self.trained.tokenizer, tmp)
                if not _is_deepspeed(acc):  # DeepSpeed shards the optimizer over the ranks
                    torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                               tmp / OPTIMIZER_FILE)
                (tmp / ARGS_FILE).write_text(json.dumps(self.args.as_dict(), indent=1) + "\n")
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            limit = self.args.training.save_total_limit
            for old in (checkpoints(self.output_dir)[:-limit] if limit else []):
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of this same run: trained weights, optimizer, schedule, position."""
        refuse_changed_settings(path, self.settings())
        state = json.loads((path / STATE_FILE).read_text())
        self.output.read_trained(self.accelerator.unwrap_model(self.model), path)
        if (path / OPTIMIZER_FILE).is_file():
            saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        elif self.accelerator.is_main_process:
            print(f"note: {path} has no optimizer state (a DeepSpeed run); AdamW's moments restart from zero")
        self.step, self.batches_done = state["step"], state["batches_done"]
        self.samples_seen, self.truncated = state["samples_seen"], state["truncated"]
        self.empty_batches, self.first_losses = state["empty_batches"], state["first_losses"]
        self.last_losses.extend(state["last_losses"])
        self.resumed_from, self.first_step = path, self.step
        if self.accelerator.is_main_process:
            print(f"resumed from {path} (step {self.step} of {self.total_steps})")

    # -- training ----------------------------------------------------------------------------------------
    def train(self, resume_from: Path | None = None) -> TrainResult:
        """Run to `total_steps`, write the final output into OUTPUT_DIR, return the run's numbers."""
        acc, t = self.accelerator, self.args.training
        if resume_from is not None:
            self.resume(resume_from)
        self._require_finite_weights()
        log = (RunLog(self.output_dir, Path(t.logging_dir or self.output_dir / "logs"), t.report_to,
                      self.output_dir.name, self.args.as_dict(), self.step) if acc.is_main_process else NullLog())
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.output_dir.name, unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        self.model.train()
        batches = endless_batches(self.loader, self.sampler, self.batches_done)
        window: list[dict[str, float]] = []
        try:
            while self.step < self.total_steps:
                window.append(self._optimizer_step(batches))
                bar.update()
                bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
                if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                    log.log(self.step, self._window_metrics(window))
                    window = []
                if t.save_strategy == "steps" and self.step % t.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        self._write_final_output()
        # Start and end windows of up to LOSS_WINDOW steps that do not overlap on short runs.
        window = max(1, min(LOSS_WINDOW, self.step // 2))
        return TrainResult(self.step, self.samples_seen, self.truncated, self.empty_batches,
                           _mean(self.first_losses[:window]), _mean(list(self.last_losses)[-window:]), window)

    def _optimizer_step(self, batches) -> dict[str, float]:
        acc, t = self.accelerator, self.args.training
        losses = []
        for _ in range(t.gradient_accumulation_steps):
            batch = next(batches)
            with acc.accumulate(self.model), acc.autocast():
                loss = self._loss(batch)
                mean_loss = self._check_and_count(loss, batch)
                acc.backward(loss)
            losses.append(mean_loss)
            self.batches_done += 1
        if t.max_grad_norm > 0:
            acc.clip_grad_norm_(self.trainable, t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        step_loss = sum(losses) / len(losses)
        if len(self.first_losses) < LOSS_WINDOW:
            self.first_losses.append(step_loss)
        self.last_losses.append(step_loss)
        return {"loss": step_loss, "learning_rate": self.scheduler.get_last_lr()[0]}

    def _loss(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         images=batch["images"].to(device), labels=batch["labels"].to(device))
        if batch["num_targets"] == 0:
            # Nothing to learn here, but every rank must still join the gradient reduction.
            return out.logits.sum() * 0.0
        return out.loss

    def _check_and_count(self, loss: torch.Tensor, batch: dict) -> float:
        """One reduction over the processes per micro-batch: stop all of them on a non-finite loss, count
        samples, truncations and empty batches, and return the loss averaged over the processes."""
        acc = self.accelerator
        stats = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, loss.item(), float(batch["num_truncated"]),
                              float(len(batch["input_ids"])), float(batch["num_targets"] == 0)], device=acc.device)
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
        bad, loss_sum, truncated, samples, empty = stats.tolist()
        if bad:
            self._diverged(loss.item())
        self.truncated += int(truncated)
        self.samples_seen += int(samples)
        self.empty_batches += int(empty)
        return loss_sum / acc.num_processes

    def _diverged(self, loss: float) -> None:
        last = latest_checkpoint(self.output_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        if self.step > self.first_step:
            raise TrainingDiverged(f"the loss became {loss} at step {self.step + 1}; {where}; lower "
                                   "--learning_rate and resume from it, or restart")
        # No update yet in this process, from weights `train` found finite: the learning rate has not acted.
        suspects = "the data (a sample or image the model cannot encode?) and --bf16 / --fp16"
        if self.resumed_from is None:
            raise TrainingDiverged(f"the loss became {loss} at step {self.step + 1}, before any update, from finite "
                                   f"weights, so not because of the learning rate: check {suspects}; {where}")
        raise TrainingDiverged(f"the loss became {loss} at step {self.step + 1}, the first after resuming from "
                               f"{self.resumed_from}, before any update, from finite weights: check {suspects}; or "
                               "the checkpoint is already unstable (too high a --learning_rate before it): resume "
                               "from an earlier one if --save_total_limit kept one, or restart with a lower "
                               "--learning_rate")

    def _require_finite_weights(self) -> None:
        """Refuse NaN or inf in any weight, trained or frozen, before the first step, naming the flag its part of
        the model came from (see encoder.loading.require_finite_weights)."""
        m = self.args.model

        def source(name: str, tensor: torch.Tensor) -> str:
            if self.resumed_from is not None and tensor.requires_grad:
                return f"checkpoint {self.resumed_from}"
            if TOWER_PART in name:
                return f"--vision_tower {m.vision_tower}"
            if PROJECTOR_PART in name:
                return (f"--pretrain_mm_mlp_adapter {m.pretrain_mm_mlp_adapter}" if m.pretrain_mm_mlp_adapter
                        else "the newly initialised projector")
            return f"--model_name_or_path {m.model_name_or_path}"

        require_finite_weights(self.accelerator.unwrap_model(self.model), source)

    def _window_metrics(self, window: list[dict[str, float]]) -> dict[str, float]:
        return {"loss": _mean([w["loss"] for w in window]), "learning_rate": window[-1]["learning_rate"],
                "epoch": self.batches_done / self.sampler.batches_per_epoch,
                "samples_seen": float(self.samples_seen), "truncated_samples": float(self.truncated),
                "empty_batches": float(self.empty_batches)}

    def _write_final_output(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)

            def write(tmp: Path) -> None:
                self.output.write(model, self.trained.tokenizer, tmp)
                (tmp / ARGS_FILE).write_text(json.dumps(self.args.as_dict(), indent=1) + "\n")

            publish(write, self.output_dir)
        acc.wait_for_everyone()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fill_deepspeed_batch_size(accelerator, per_device: int) -> None:
    """LLaVA's zero2.json says "auto" for the micro-batch, which accelerate resolves only from a prepared
    DataLoader; this loop keeps its own batch plan, so it states the size itself."""
    if not _is_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = per_device
