"""Contrastive training of a CLIP or CLIP-MoE on image-text pairs, on one CPU process or several GPUs.

Built on accelerate (DDP, bf16 autocast where the device supports it). The batch plan is ours, not
accelerate's: a `ClusterBatchSampler` gives every rank its share of the same global batch, which is what
Multistage Contrastive Learning needs, and it makes resuming mid-epoch exact (skip the batches done).

Checkpoints hold only the trainable parameters, the optimizer and the schedule: the frozen weights are the
starting model's, so an FFN-only stage of a ViT-L does not write the whole model every N steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from encoder.loading import require_finite_weights
from encoder.training import ClusterBatchSampler, NullLog, RunLog, endless_batches, make_accelerator
from encoder.utils.errors import TrainingDiverged, UserError
from encoder.utils.files import atomic_output_dir
from encoder.utils.step_record import SettingsChanged, differences

from .config import NOT_SHAPING, TrainConfig, check_settings
from .losses import clip_contrastive_loss
from .params import select_trainable

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


class ContrastiveHead(nn.Module):
    """Wraps a CLIP / CLIP-MoE so that one forward call (the one DDP hooks) yields everything the loss needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_moe = getattr(model.config, "model_type", "") == "clip_moe"

    def forward(self, pixel_values, input_ids, attention_mask):
        kw = {"output_router_logits": True} if self.is_moe else {}
        vision = self.model.get_image_features(pixel_values=pixel_values, **kw)
        text = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw)
        zero = vision.pooler_output.new_zeros((), dtype=torch.float32)
        balance = sum((t.load_balance_loss for t in (vision, text) if _has(t, "load_balance_loss")), zero)
        z_loss = sum((t.router_z_loss for t in (vision, text) if _has(t, "router_z_loss")), zero)
        return (nn.functional.normalize(vision.pooler_output.float(), dim=-1),
                nn.functional.normalize(text.pooler_output.float(), dim=-1), balance, z_loss)


def _has(output, field: str) -> bool:
    return getattr(output, field, None) is not None


def _accelerator(precision: str):
    mixed = "no"
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        mixed = "bf16"
    return make_accelerator(mixed)


def _checkpoints(work_dir: Path) -> list[Path]:
    found = [p for p in work_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `work_dir` (written atomically, so complete means usable)."""
    found = _checkpoints(Path(work_dir))
    return found[-1] if found else None


def load_trained_parameters(model: nn.Module, path: str | Path) -> list[str]:
    """Load a checkpoint's (or final) trainable tensors into `model`; returns their names."""
    tensors = load_file(str(Path(path) / "trainable.safetensors") if Path(path).is_dir() else str(path))
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise UserError(f"{path} holds weights the model does not have (e.g. {sorted(missing)[0]}); "
                        "it belongs to a different model")
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)


class ContrastiveTrainer:
    """Trains `model` in place on `dataset` (items: pixel_values + caption; `collate_fn` tokenizes).

    `labels` (one int per pair) restricts every global batch to one label; None = ordinary shuffling.
    `work_dir` receives checkpoints (`step-N/`), `metrics.jsonl` and TensorBoard logs (`tb/`).
    `identity`: what else makes this run (the model's and data's names and hashes), recorded in every
    checkpoint beside the config; a resume with anything that shapes the result changed is refused.
    `source`: how messages name the starting model (default: identity["model"]); its weights, trained and
    frozen, must be finite, which `train` checks before the first step.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, collate_fn: Callable, config: TrainConfig,
                 work_dir: str | Path, labels=None, identity: dict | None = None, source: str | None = None):
        check_settings(config)  # again: a dataclass field may have been changed since it was made
        self.config = config
        self.work_dir = Path(work_dir)
        self.source = source or str((identity or {}).get("model") or "the model to train")
        self.accelerator = _accelerator(config.precision)
        acc = self.accelerator
        if config.batch_size % acc.num_processes:
            raise UserError(f"--batch-size {config.batch_size} must be a multiple of the {acc.num_processes} "
                            "processes (it is the global batch)")
        n = len(dataset)
        if n < config.batch_size:
            raise UserError(f"{n} training pairs but the global batch is {config.batch_size}; "
                            "lower --batch-size or add data")
        self.model = model
        self.trainable = select_trainable(model, config.trainable)
        if config.logit_scale is not None and hasattr(model, "logit_scale"):
            model.logit_scale.requires_grad_(False)
            self.trainable = [t for t in self.trainable if t != "logit_scale"]
        self.sampler = ClusterBatchSampler(labels if labels is not None else [0] * n, config.batch_size,
                                           acc.num_processes, acc.process_index, config.seed)
        batch_plan = hashlib.sha256(json.dumps([int(x) for x in labels] if labels is not None else n).encode())
        self.identity = {**(identity or {}), "pairs": n, "batch_plan_sha256": batch_plan.hexdigest()}
        workers = config.num_workers
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if acc.device.type == "cuda" else 0
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate_fn, num_workers=workers,
                                 pin_memory=acc.device.type == "cuda", persistent_workers=False)
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(self.steps_per_epoch * config.epochs))

        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * self.total_steps),
                                                    self.total_steps)
        self.head, self.optimizer = acc.prepare(ContrastiveHead(model), optimizer)
        self.scheduler = scheduler
        self.step = 0
        self.batches_done = 0  # global micro-batches consumed, over all epochs
        self.pairs_seen = 0
        self.resumed_from: Path | None = None
        self.first_step = 0  # the step this process started from (no update made by it before)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.work_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        acc = self.accelerator
        if acc.is_main_process:
            model = acc.unwrap_model(self.head).model
            named = dict(model.named_parameters())
            tensors = {k: named[k].detach().cpu().contiguous() for k in self.trainable}
            state = {"step": self.step, "batches_done": self.batches_done, "pairs_seen": self.pairs_seen,
                     "config": asdict(self.config), "identity": self.identity, "num_processes": acc.num_processes}

            def write(tmp: Path) -> None:
                save_file(tensors, str(tmp / "trainable.safetensors"))
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           tmp / "optimizer.pt")
                (tmp / "state.json").write_text(json.dumps(state, indent=1))

            with atomic_output_dir(path, overwrite=True) as tmp:
                write(tmp)
            for old in _checkpoints(self.work_dir)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of this same run: parameters, optimizer, schedule, batch position."""
        state = json.loads((path / "state.json").read_text())
        changed = differences(self.shaping_settings(state.get("config", {}), state.get("identity", {})),
                              self.shaping_settings(asdict(self.config), self.identity))
        if changed:
            raise SettingsChanged(f"{path} belongs to a run with other settings ({'; '.join(changed)}); resume with "
                                  "the same settings, or remove the work directory to start over")
        if state["num_processes"] != self.accelerator.num_processes:
            raise UserError(f"{path} was written by {state['num_processes']} processes, this run has "
                            f"{self.accelerator.num_processes}; resume with the same number of processes")
        model = self.accelerator.unwrap_model(self.head).model
        require_finite_weights(model, f"checkpoint {path}", load_trained_parameters(model, path))
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step, self.batches_done, self.pairs_seen = state["step"], state["batches_done"], state["pairs_seen"]
        self.resumed_from, self.first_step = path, self.step
        if self.accelerator.is_main_process:
            print(f"{self.config.desc}: resumed from {path} (step {self.step} of {self.total_steps})")

    @staticmethod
    def shaping_settings(config: dict, identity: dict) -> dict:
        """The settings a resumed run must share with its checkpoint: all but logging and I/O choices."""
        return {**{k: v for k, v in config.items() if k not in NOT_SHAPING}, **identity}

    # -- training ----------------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        acc, cfg = self.accelerator, self.config
        image, text, balance, z = self.head(batch["pixel_values"].to(acc.device), batch["input_ids"].to(acc.device),
                                            batch["attention_mask"].to(acc.device))
        model = acc.unwrap_model(self.head).model
        scale = cfg.logit_scale if cfg.logit_scale is not None else model.logit_scale.exp().clamp(max=100)
        contrastive = clip_contrastive_loss(image, text, scale, cfg.label_smoothing)
        loss = contrastive + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        return loss, {"contrastive": contrastive.item(), "load_balance": balance.item(), "z_loss": z.item()}

    def train(self, resume: bool = True) -> nn.Module:
        """Run to `total_steps` (resuming from the newest checkpoint in work_dir when asked); return the model."""
        acc, cfg = self.accelerator, self.config
        last = latest_checkpoint(self.work_dir) if resume else None
        if last is not None:
            self.resume(last)
        require_finite_weights(acc.unwrap_model(self.head).model, self.source)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = (RunLog(self.work_dir, self.work_dir / "tb", ["tensorboard"], cfg.desc, asdict(cfg), self.step)
               if acc.is_main_process else NullLog())
        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.desc, unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        self.head.train()
        batches = endless_batches(self.loader, self.sampler, self.batches_done)
        try:
            while self.step < self.total_steps:
                logs = self._optimizer_step(batches)
                bar.update()
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                log.log(self.step, logs)
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        self.save_checkpoint()
        model = acc.unwrap_model(self.head).model
        return model.eval()

    def _optimizer_step(self, batches) -> dict[str, float]:
        acc, cfg = self.accelerator, self.config
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1
            with acc.autocast(), (acc.no_sync(self.head) if not sync else nullcontext()):
                loss, parts = self._loss(batch)
                self._stop_if_diverged(loss)
                acc.backward(loss / cfg.grad_accum)
            self.batches_done += 1
            self.pairs_seen += len(batch["captions"]) * acc.num_processes
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        if cfg.max_grad_norm:
            acc.clip_grad_norm_([p for p in self.head.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**totals, "lr": self.scheduler.get_last_lr()[0], "pairs_seen": float(self.pairs_seen)}

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        last = latest_checkpoint(self.work_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        if self.step > self.first_step:
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; {where}; lower the "
                                   "learning rate (--lr) and resume or restart")
        # No update yet in this process, and `train` found the weights finite: this run's learning rate has not
        # acted on them, so the batch, the loss settings or the precision are the suspects.
        suspects = "the data (an image or caption the model cannot encode?), --logit-scale or --precision"
        if self.resumed_from is None:
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}, before any update, from the "
                                   f"finite weights of {self.source}, so not because of the learning rate: check "
                                   f"{suspects}; {where}")
        raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}, the first after resuming from "
                               f"{self.resumed_from}, before any update, from finite weights: check {suspects}; "
                               "or the checkpoint is already unstable (too high a --lr before it): remove the work "
                               "directory and restart with a lower --lr")
