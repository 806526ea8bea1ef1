"""Contrastive training of a CLIP or SigLIP (dense or MoE) on image-text pairs, on one CPU process or several GPUs.

The loss is the model family's own (`--loss family`): CLIP's symmetric InfoNCE, or SigLIP's pairwise sigmoid loss
whose learned `logit_bias` trains with the rest (`upcycle.train.losses`). A SigLIP trained with the CLIP loss is
refused: its `logit_bias` would get no gradient, which DDP stops on (open_clip #1076), and the logits the model
answers with (bias included) would be trained by a loss that never sees the bias.

The loop (accumulation, checkpoints, resume, divergence stop, log) is `encoder.training.loop`'s; this module
says what a batch's loss is, what is trained, and what a checkpoint holds. The batch plan is a
`ClusterBatchSampler`: every global batch from one cluster, which is what Multistage Contrastive Learning needs.

Checkpoints hold only the trainable parameters, the optimizer and the schedule: the frozen weights are the
starting model's, so an FFN-only stage of a ViT-L does not write the whole model every N steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from encoder.family import is_full_moe
from encoder.loading import require_finite_weights
from encoder.training import ClusterBatchSampler, make_accelerator
from encoder.training.deepspeed_config import LoopOwned, check_launch, engine_settings
from encoder.training.loop import CheckpointDir, LoopPlan, TrainingLoop, adamw, refuse_changed_settings
from encoder.training.lower_lr import LowerLrResume
from encoder.training.sharded import is_sharded
from encoder.utils.errors import UserError

from ..data.family_inputs import check_image_inputs, family_label, uses_sigmoid_loss
from .config import ADDED_SETTINGS, NOT_SHAPING, RESUME_LOWER_LR, TrainConfig
from .losses import clip_contrastive_loss, siglip_sigmoid_loss
from .params import select_trainable

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
TRAINED_FILE = "trainable.safetensors"


class ContrastiveHead(nn.Module):
    """Wraps a CLIP / SigLIP (dense or MoE) so that one forward call (the one DDP hooks) yields everything the loss
    needs, the learned temperature and SigLIP's logit bias included: under ZeRO-3 and FSDP2 a weight exists whole
    only inside the forward.

    `own_logit_scale`: take CLIP's 0-dim `logit_scale` into the head as a 1-element weight (DeepSpeed's
    flattened buffers and FSDP2's shards have no place for a 0-dim tensor); `clip_weights` maps it back."""

    def __init__(self, model: nn.Module, own_logit_scale: bool = False):
        super().__init__()
        self.model = model
        self.is_moe = is_full_moe(model.config)
        if own_logit_scale and "logit_scale" in model._parameters:
            scale = model._parameters.pop("logit_scale")
            # In a submodule: accelerate's FSDP2 preparation expects every weight name to have a module part.
            self.owned = nn.ParameterDict({"logit_scale": nn.Parameter(scale.detach().reshape(1).clone(),
                                                                       requires_grad=scale.requires_grad)})

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """-> (image_emb, text_emb) L2-normalised fp32, the balance and z-losses summed over both towers, the
        logit multiplier (`logit_scale.exp()`, at most 100) and the logit bias (0 for a model without one).
        `attention_mask` None: the text tower attends to every position (SigLIP's fixed-length input)."""
        kw = {"output_router_logits": True} if self.is_moe else {}
        vision = self.model.get_image_features(pixel_values=pixel_values, **kw)
        text = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw)
        zero = vision.pooler_output.new_zeros((), dtype=torch.float32)
        balance = sum((t.load_balance_loss for t in (vision, text) if _has(t, "load_balance_loss")), zero)
        z_loss = sum((t.router_z_loss for t in (vision, text) if _has(t, "router_z_loss")), zero)
        scale = self.owned["logit_scale"] if hasattr(self, "owned") else getattr(self.model, "logit_scale", zero)
        bias = getattr(self.model, "logit_bias", zero)
        return (nn.functional.normalize(vision.pooler_output.float(), dim=-1),
                nn.functional.normalize(text.pooler_output.float(), dim=-1), balance, z_loss,
                scale.float().exp().reshape(()).clamp(max=100), bias.float().reshape(()))

    @staticmethod
    def clip_weights(weights: dict[str, torch.Tensor], scale_shape: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """The head's state dict under the model's own names and shapes (`scale_shape`: its `logit_scale`'s,
        0-dim for CLIP, [1] for SigLIP)."""
        out = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
        if "owned.logit_scale" in weights:
            out["logit_scale"] = weights["owned.logit_scale"].reshape(scale_shape)
        return out


def _has(output, field: str) -> bool:
    return getattr(output, field, None) is not None


def with_model_loss_weights(config: TrainConfig, model: nn.Module) -> TrainConfig:
    """`config` with the auxiliary-loss weights it leaves to the model (None) read from the model's CLIP-MoE config
    (`aux_loss_coef`, `router_z_loss_coef`), the one source of their defaults; 0 for a dense model (no router)."""
    model_config = model.config.vision_config if is_full_moe(model.config) else None
    aux = config.aux_loss_coef if config.aux_loss_coef is not None else (
        model_config.aux_loss_coef if model_config is not None else 0.0)
    z = config.z_loss_coef if config.z_loss_coef is not None else (
        model_config.router_z_loss_coef if model_config is not None else 0.0)
    return replace(config, aux_loss_coef=aux, z_loss_coef=z)


def sigmoid_loss_for(config: TrainConfig, model_config) -> bool:
    """Whether `config` trains the model of `model_config` (its config or directory) with the sigmoid loss: the
    family's own loss, or the one --loss names when the model can train with it. A UserError (one line) for a
    loss the model cannot train with, and for --label-smoothing with the sigmoid loss (InfoNCE's, it has none)."""
    sigmoid = uses_sigmoid_loss(model_config)
    if config.loss == "clip" and sigmoid:
        raise UserError(f"--loss clip: the CLIP loss asked for a {family_label(model_config)} model, whose "
                        "logit_bias it would leave untrained (a DDP error with several processes); use --loss "
                        "family, its sigmoid loss")
    if config.loss == "sigmoid" and not sigmoid:
        raise UserError(f"--loss sigmoid: the sigmoid loss asked for a {family_label(model_config)} model, which "
                        "has no logit_bias; use --loss family, its CLIP loss")
    if sigmoid and config.label_smoothing:
        raise UserError(f"--label-smoothing {config.label_smoothing}: the sigmoid loss of a "
                        f"{family_label(model_config)} model has no label smoothing (InfoNCE's); leave it at 0")
    return sigmoid


def _loop_owned(config: TrainConfig) -> LoopOwned:
    """What this trainer's loop decides from its flags, for the launch checks (`deepspeed_config.check_launch`)."""
    precision, mixed = config.precision, "no"
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        mixed = "bf16"
    return LoopOwned(
        accumulation=config.grad_accum, batch=config.batch_size, batch_is_global=True,
        max_grad_norm=config.max_grad_norm or 0.0, precision=mixed, accumulation_flag="--grad-accum",
        batch_flag="--batch-size", clipping_flag="--max-grad-norm", precision_flag="--precision",
        optimizer_flags="--lr, --weight-decay", schedule_flags="--warmup-ratio, with a cosine decay")


def check_launch_fits(config: TrainConfig) -> None:
    """Refuse, before a command loads its model, a launch (DeepSpeed config, accelerate's own accumulation) that
    contradicts `config`; the trainer checks again when it makes its Accelerator."""
    check_launch(_loop_owned(config))


def _accelerator(config: TrainConfig):
    loop = _loop_owned(config)
    return make_accelerator(loop.precision, loop=loop)


def _checkpoint_dir(work_dir: str | Path) -> CheckpointDir:
    return CheckpointDir(Path(work_dir), CHECKPOINT_PREFIX, STATE_FILE)


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `work_dir` (written atomically, so complete means usable)."""
    return _checkpoint_dir(work_dir).latest()


def load_trained_parameters(model: nn.Module, path: str | Path) -> list[str]:
    """Load a checkpoint's (or final) trainable tensors into `model`; returns their names."""
    tensors = load_file(str(Path(path) / TRAINED_FILE) if Path(path).is_dir() else str(path))
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise UserError(f"{path} holds weights the model does not have (e.g. {sorted(missing)[0]}); "
                        "it belongs to a different model")
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)


class ContrastiveTrainer(TrainingLoop):
    """Trains `model` in place on `dataset` (items: pixel_values + caption; `collate_fn` tokenizes).

    `labels` (one int per pair) restricts every global batch to one label; None = ordinary shuffling.
    `work_dir` receives checkpoints (`step-N/`, only the newest kept), `metrics.jsonl` and TensorBoard logs (`tb/`).
    `identity`: what else makes this run (the model's and data's names and hashes), recorded in every
    checkpoint beside the config; a resume with anything that shapes the result changed is refused.
    `source`: how messages name the starting model (default: identity["model"]); its weights, trained and
    frozen, must be finite, which `train` checks before the first step.
    `lower_lr_resume`: the flags that make a run of the caller's command resume at a lower --lr (TrainConfig's
    resume_lower_lr), named by the divergence stop; None where the command has no such resume (DMU, compare).
    `lr_flag`: the caller's flag for `config.lr`, named by the divergence stop (DMU's router training sets it with
    --router-lr, so advice to lower --lr would change the MCL stages instead).
    """

    suspects = "the data (an image or caption the model cannot encode?), --logit-scale or --precision"

    def __init__(self, model: nn.Module, dataset: Dataset, collate_fn: Callable, config: TrainConfig,
                 work_dir: str | Path, labels=None, identity: dict | None = None, source: str | None = None,
                 lower_lr_resume: str | None = None, lr_flag: str = "--lr"):
        check_image_inputs(model.config)  # before anything is made or written
        self.sigmoid = sigmoid_loss_for(config, model.config)
        config = self.config = with_model_loss_weights(config, model)
        self.work_dir = Path(work_dir)
        self.lr_flag = lr_flag
        self.unstable_fix = f"remove the work directory and restart with a lower {lr_flag}"
        acc = _accelerator(config)
        if config.batch_size % acc.num_processes:
            raise UserError(f"--batch-size {config.batch_size} must be a multiple of the {acc.num_processes} "
                            "processes (it is the global batch)")
        n = len(dataset)
        if n < config.batch_size:
            raise UserError(f"{n} training pairs but the global batch is {config.batch_size}; "
                            "lower --batch-size or add data")
        self.clip = model
        self.trainable = select_trainable(model, config.trainable)  # names (the DMU manifest lists them)
        if config.logit_scale is not None and hasattr(model, "logit_scale"):
            model.logit_scale.requires_grad_(False)
            self.trainable = [t for t in self.trainable if t != "logit_scale"]
        sampler = ClusterBatchSampler(labels if labels is not None else [0] * n, config.batch_size,
                                      acc.num_processes, acc.process_index, config.seed)
        batch_plan = hashlib.sha256(json.dumps([int(x) for x in labels] if labels is not None else n).encode())
        # The DeepSpeed config by its content: a resume under an edited one is refused like a changed flag.
        self.identity = {**(identity or {}), "pairs": n, "batch_plan_sha256": batch_plan.hexdigest(),
                         **engine_settings(acc)}
        workers = config.num_workers
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if acc.device.type == "cuda" else 0
        self.steps_per_epoch = max(1, sampler.batches_per_epoch // config.grad_accum)
        total = config.max_steps or max(1, math.ceil(self.steps_per_epoch * config.epochs))
        # The engine partitions and rewraps what it trains: under ZeRO / FSDP2 that is a copy, and `model` stays
        # whole (on the CPU) and receives the trained weights at the end, so callers get a plain model whatever
        # the engine.
        head = (ContrastiveHead(copy.deepcopy(model), own_logit_scale=True) if is_sharded(acc)
                else ContrastiveHead(model))
        optimizer = adamw([p for p in head.parameters() if p.requires_grad], config.lr, config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
        plan = LoopPlan(total_steps=total, accumulation=config.grad_accum, max_grad_norm=config.max_grad_norm or 0.0,
                        save_every=config.checkpoint_every, save_total_limit=1, log_every=1, desc=config.desc, seed=config.seed,
                        log_dir=self.work_dir / "tb", config=asdict(config))
        super().__init__(acc, head, optimizer, scheduler, dataset, sampler, collate_fn,
                         workers, plan, _checkpoint_dir(self.work_dir),
                         source or str((identity or {}).get("model") or "the model to train"))
        self.pairs_seen = 0
        self.lower_lr_resume = lower_lr_resume
        self.lr_change = LowerLrResume(self.lr_flag, RESUME_LOWER_LR)

    # -- what a checkpoint holds: only the trainable tensors (the frozen ones are the starting model's) ---------
    def _write_trained(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        scale = getattr(self.clip, "logit_scale", None)
        named = ContrastiveHead.clip_weights(weights, tuple(scale.shape) if scale is not None else ())
        save_file({k: named[k].detach().cpu().contiguous() for k in self.trainable}, str(directory / TRAINED_FILE))

    def _read_trained(self, directory: Path) -> None:
        require_finite_weights(self.clip, f"checkpoint {directory}", load_trained_parameters(self.clip, directory))

    def _record(self) -> dict:
        return {"pairs_seen": self.pairs_seen, "config": asdict(self.config), "identity": self.identity,
                "num_processes": self.accelerator.num_processes, **self.lr_change.record()}

    def _restore(self, record: dict) -> None:
        self.pairs_seen = record["pairs_seen"]
        self.lr_change.restore(record, self.scheduler, self.step)

    def _refuse_changed_settings(self, path: Path) -> None:
        state = json.loads((path / STATE_FILE).read_text())
        recorded, note = {**ADDED_SETTINGS, **state.get("config", {})}, ""
        if "lr" in recorded:
            lr, allowed = self.config.lr, self.config.resume_lower_lr
            note = self.lr_change.refusal_note(recorded["lr"], lr, allowed)
            if self.lr_change.accept(path, recorded["lr"], lr, allowed):
                recorded["lr"] = lr
        refuse_changed_settings(path, self.shaping_settings(recorded, state.get("identity", {})),
                                self.shaping_settings(asdict(self.config), self.identity),
                                "resume with the same settings, or remove the work directory to start over", note)
        if state["num_processes"] != self.accelerator.num_processes:
            raise UserError(f"{path} was written by {state['num_processes']} processes, this run has "
                            f"{self.accelerator.num_processes}; resume with the same number of processes")

    @staticmethod
    def shaping_settings(config: dict, identity: dict) -> dict:
        """The settings a resumed run must share with its checkpoint: all but logging and I/O choices."""
        return {**{k: v for k, v in config.items() if k not in NOT_SHAPING}, **identity}

    # -- training ----------------------------------------------------------------------------------------------
    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device, cfg = self.accelerator.device, self.config
        mask = batch.get("attention_mask")  # none for SigLIP's fixed-length, unmasked text
        image, text, balance, z, learned, bias = self.model(batch["pixel_values"].to(device),
                                                            batch["input_ids"].to(device),
                                                            mask.to(device) if mask is not None else None)
        scale = cfg.logit_scale if cfg.logit_scale is not None else learned
        if self.sigmoid:
            contrastive = siglip_sigmoid_loss(image, text, scale, bias)
        else:
            contrastive = clip_contrastive_loss(image, text, scale, cfg.label_smoothing)
        loss = contrastive + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        return loss, {"contrastive": contrastive.item(), "load_balance": balance.item(), "z_loss": z.item(),
                      "pairs": float(len(batch["captions"]))}

    def _step_metrics(self, micro: list[dict[str, float]]) -> dict[str, float]:
        """The step's loss and its parts averaged over micro-batches and processes (`_forward`'s parts arrive
        summed over the processes), the learning rate and the pairs seen so far."""
        processes = self.accelerator.num_processes
        self.pairs_seen += int(sum(m["pairs"] for m in micro))
        means = {key: sum(m[key] for m in micro) / len(micro) / (1 if key == "loss" else processes)
                 for key in ("loss", "contrastive", "load_balance", "z_loss")}
        return {**means, "lr": self.scheduler.get_last_lr()[0], "pairs_seen": float(self.pairs_seen)}

    def _log_values(self, steps: list[dict[str, float]]) -> dict[str, float]:
        return self.lr_change.note(steps[-1])

    def _require_finite_weights(self) -> None:
        require_finite_weights(self.clip, self.source)

    def train(self, resume: bool = True) -> nn.Module:
        """Run to `total_steps` (resuming from the newest checkpoint in work_dir when asked); return the model.
        The last checkpoint (`step-<total_steps>`) is the run's record."""
        self.run(self.checkpoints.latest() if resume else None)
        final = self.save_checkpoint()
        if is_sharded(self.accelerator):
            load_trained_parameters(self.clip, final)  # every rank: the whole model, from the gathered weights
        return self.clip.eval()
