"""LLaVA stage 1 / stage 2 on the shared loop (`encoder.training.loop`): the loss, what is trained, the files.

The loop core does the order per optimizer step (micro-batches under `accelerator.accumulate`: loss ->
divergence check -> backward; clip, optimizer and schedule step, log, checkpoint). Batches come from a
one-cluster `ClusterBatchSampler` (plain shuffles), or with `--group_by_modality_length True` from LLaVA's
modality- and length-grouped plan (`sampler.ModalityLengthBatchSampler`): either way every global batch
(per-device batch x processes) is planned from the seed and the epoch, the same on every rank, and split into
equal shares, so a resumed run sees exactly the batches an uninterrupted run sees.

Checkpoints (`OUTPUT_DIR/checkpoint-N/`, written atomically, the newest `--save_total_limit` kept) hold the
run's output files (usable as they are, e.g. as a stage-2 `--pretrain_mm_mlp_adapter`), the optimizer and
schedule, the flags and the loop's position.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from encoder.loading import require_finite_weights
from encoder.moe import routing_losses
from encoder.routing_stats import RoutingTally
from encoder.training import ClusterBatchSampler
from encoder.training.deepspeed_config import engine_settings
from encoder.training.loop import CheckpointDir, LoopPlan, TrainingLoop, adamw
from encoder.training.loop import refuse_changed_settings as refuse_changed
from encoder.training.lower_lr import LowerLrResume
from encoder.training.sharded import full_state_dict, shards_parameters, whole_numel
from encoder.utils.errors import UserError

from .arguments import LlavaArguments, shaping_settings, trains_tower
from .data import modality_lengths
from .model_setup import TrainingModel
from .outputs import FullOutput, ProjectorOutput, publish, remove_stale_final
from .sampler import ModalityLengthBatchSampler

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
ARGS_FILE = "training_args.json"
LOSS_WINDOW = 10  # steps averaged for the start and end loss of the summary
TOWER_PART, PROJECTOR_PART = ".vision_tower.", ".mm_projector."  # in the names of the tower's / projector's weights


def _checkpoint_dir(output_dir: str | Path) -> CheckpointDir:
    return CheckpointDir(Path(output_dir), CHECKPOINT_PREFIX, STATE_FILE)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    return _checkpoint_dir(output_dir).all()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    return _checkpoint_dir(output_dir).latest()


# What a run derives from its flags, its data and its launch that must also match on resume (the flags
# themselves are compared through `shaping_settings`). TOTAL_STEPS is known only once the data is tokenized.
NUM_PROCESSES, TOTAL_STEPS = "num_processes", "total_steps"
LR_FLAG, RESUME_LOWER_LR = "--learning_rate", "--resume_lower_lr"


def run_settings(args: LlavaArguments, num_processes: int, total_steps: int | None = None,
                 engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (without total_steps when it is not known yet).
    `engine`: the DeepSpeed config's values (`deepspeed_config.engine_settings`), compared by content."""
    settings = {**shaping_settings(args.as_dict()), NUM_PROCESSES: num_processes, **(engine or {})}
    if total_steps is not None:
        settings[TOTAL_STEPS] = total_steps
    return settings


# Flags added after checkpoints were written, with the value every run before them had: a record that lacks one
# made its run that way, so its resume is not refused for a setting its version could not name. (A flag missing
# for any other reason still shows as unset.)
ADDED_SETTINGS = {"--image_grid_pinpoints": None, "--unfreeze_mm_vision_tower": False, "--mm_tunable_parts": None,
                  "--mm_vision_tower_lr": None, "--balance_loss_coef": None, "--router_z_loss_coef": None}


def recorded_settings(path: Path) -> dict[str, Any]:
    """The settings `path` (a checkpoint-N directory) was made with.

    Checkpoints record them in trainer_state.json; older ones recorded a few in its "identity" and every flag in
    training_args.json, which is read instead (flags that version did not have then show as unset, except
    `ADDED_SETTINGS`)."""
    return {**ADDED_SETTINGS, **_recorded(path)}


def _recorded(path: Path) -> dict[str, Any]:
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


def refuse_changed_settings(path: Path, wanted: dict[str, Any], lower_lr: bool = False,
                            lr_change: LowerLrResume | None = None) -> None:
    """Raise SettingsChanged naming every setting in which `path` differs from `wanted` (old -> new), in one line.

    Settings `wanted` leaves out (total_steps, before the data is tokenized) are not compared. `lower_lr`
    (--resume_lower_lr) accepts a lower --learning_rate, which `lr_change` (the trainer's) then applies."""
    recorded = {k: v for k, v in recorded_settings(path).items() if k in wanted or k != TOTAL_STEPS}
    why = "; (unset) marks what the older version that wrote it did not record" if set(wanted) - set(recorded) else ""
    lr_change = lr_change or LowerLrResume(LR_FLAG, RESUME_LOWER_LR)
    if isinstance(recorded.get(LR_FLAG), (int, float)) and LR_FLAG in wanted:
        why += lr_change.refusal_note(recorded[LR_FLAG], wanted[LR_FLAG], lower_lr)
        if lr_change.accept(path, recorded[LR_FLAG], wanted[LR_FLAG], lower_lr):
            recorded[LR_FLAG] = wanted[LR_FLAG]
    refuse_changed(path, recorded, wanted, "resume with the same flags, or pass --overwrite_output_dir True to "
                   "start afresh", why)


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    truncated: int  # samples cut to --model_max_length (each time one was drawn)
    empty_batches: int  # micro-batches with no target token left (they add nothing to the loss)
    start_loss: float  # mean over the first `loss_window` steps
    end_loss: float  # mean over the last `loss_window` steps
    loss_window: int  # LOSS_WINDOW, or half the steps on shorter runs


class LlavaTrainer(TrainingLoop):
    """Trains `trained.model` in place on `dataset`; `output` decides what checkpoints and the final output hold."""

    lr_flag = LR_FLAG
    lower_lr_resume = f"{RESUME_LOWER_LR} True"
    suspects = "the data (a sample or image the model cannot encode?) and --bf16 / --fp16"
    unstable_fix = "resume from an earlier one if --save_total_limit kept one, or restart with a lower --learning_rate"

    def __init__(self, accelerator, trained: TrainingModel, dataset: Dataset, collate, args: LlavaArguments,
                 output: ProjectorOutput | FullOutput):
        acc, t = accelerator, args.training
        self.args, self.output, self.trained = args, output, trained
        self.output_dir = Path(t.output_dir)
        processes = acc.num_processes
        if t.group_by_modality_length:
            sampler = ModalityLengthBatchSampler(modality_lengths(dataset.samples, getattr(dataset, "layout", None)),
                                                 t.per_device_train_batch_size,
                                                 processes, acc.process_index, t.seed,
                                                 accumulation=t.gradient_accumulation_steps)
        else:
            sampler = ClusterBatchSampler([0] * len(dataset), t.per_device_train_batch_size * processes,
                                          processes, acc.process_index, t.seed)
        if sampler.batches_per_epoch == 0:
            raise UserError(f"{len(dataset)} samples cannot be shared by {processes} processes; add data")
        workers = t.dataloader_num_workers
        if workers is None:
            workers = 4 if acc.device.type == "cuda" else 0
        self.steps_per_epoch = max(1, sampler.batches_per_epoch // t.gradient_accumulation_steps)
        total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * self.steps_per_epoch))
        self.router_losses = RouterLosses.of(trained.model, args) if trains_tower(args) else None
        optimizer = _optimizer(trained.model, args)
        from transformers import get_scheduler

        warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total)
        scheduler = get_scheduler(t.lr_scheduler_type, optimizer, warmup, total)
        plan = LoopPlan(total_steps=total, accumulation=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
                        save_every=t.save_steps if t.save_strategy == "steps" else 0,
                        save_total_limit=t.save_total_limit, log_every=t.logging_steps, desc=self.output_dir.name, seed=t.seed,
                        log_dir=Path(t.logging_dir or self.output_dir / "logs"), report_to=t.report_to,
                        config=args.as_dict())
        if shards_parameters(acc) and not trains_tower(args):
            _keep_tower_whole(trained.model, acc.device)  # a tower that trains is sharded with the rest
        super().__init__(acc, trained.model, optimizer, scheduler, dataset, sampler, collate, workers, plan,
                         _checkpoint_dir(self.output_dir), "the model")
        self.trainable = self.trained_params
        self.samples_seen = 0
        self.truncated = 0
        self.empty_batches = 0
        self.first_losses: list[float] = []
        self.last_losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.lr_change = LowerLrResume(LR_FLAG, RESUME_LOWER_LR)

    # -- checkpoints: LLaVA's output files, the flags, and the run's counters ---------------------------------
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it: every flag that shapes the result,
        the number of processes and the number of optimizer steps (which the data decides too)."""
        return run_settings(self.args, self.accelerator.num_processes, self.total_steps,
                            engine_settings(self.accelerator))

    def _refuse_changed_settings(self, path: Path) -> None:
        refuse_changed_settings(path, self.settings(), self.args.training.resume_lower_lr, self.lr_change)

    def _write_trained(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        self.output.write(self.accelerator.unwrap_model(self.model), self.trained.tokenizer, directory, weights,
                          final=self.checkpoints.path(self.step).resolve())
        (directory / ARGS_FILE).write_text(json.dumps(self.args.as_dict(), indent=1) + "\n")

    def _read_trained(self, directory: Path) -> None:
        self.output.read_trained(self.accelerator.unwrap_model(self.model), directory)

    def _record(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "truncated": self.truncated, "empty_batches": self.empty_batches,
                "first_losses": self.first_losses, "last_losses": list(self.last_losses), "settings": self.settings(),
                # a frozen tower: held whole by every rank, outside the engine's accounting under ZeRO-3 / FSDP2
                # (_keep_tower_whole); one that trains: sharded by the engine and counted in its accounting
                "vision_tower_parameters": sum(whole_numel(p)
                                               for p in self.trained.model.get_vision_tower().parameters()),
                **self.lr_change.record()}

    def _restore(self, record: dict[str, Any]) -> None:
        self.samples_seen, self.truncated = record["samples_seen"], record["truncated"]
        self.empty_batches, self.first_losses = record["empty_batches"], record["first_losses"]
        self.last_losses.extend(record["last_losses"])
        self.lr_change.restore(record, self.scheduler, self.step)

    # -- training ----------------------------------------------------------------------------------------------
    def train(self, resume_from: Path | None = None) -> TrainResult:
        """Run to `total_steps`, write the final output into OUTPUT_DIR, return the run's numbers."""
        if self.accelerator.is_main_process:
            remove_stale_final(self.output_dir)  # a killed final write's copy of the model
        self.run(resume_from)
        self._save_last_step()
        self._write_final_output()
        # Start and end windows of up to LOSS_WINDOW steps that do not overlap on short runs.
        window = max(1, min(LOSS_WINDOW, self.step // 2))
        return TrainResult(self.step, self.samples_seen, self.truncated, self.empty_batches,
                           _mean(self.first_losses[:window]), _mean(list(self.last_losses)[-window:]), window)

    def _loss(self, batch: dict) -> torch.Tensor:
        """The loss to optimize: the LM loss plus, for a MoE tower that trains, the router losses with their
        coefficients, as CuMo adds them (the parts, for the metrics, in `loss_parts`)."""
        device = self.accelerator.device
        images = batch["images"]  # one tensor, or under anyres a list of per-image crop stacks
        images = [im.to(device) for im in images] if isinstance(images, list) else images.to(device)
        if self.router_losses is not None:
            self.router_losses.clear()
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         images=images, image_sizes=batch["image_sizes"], labels=batch["labels"].to(device))
        if batch["num_targets"] == 0:
            # Nothing to learn here, but every rank must still join the gradient reduction.
            loss = out.logits.sum() * 0.0
        else:
            loss = out.loss
        if self.router_losses is None:
            return loss
        balance, z = self.router_losses.losses()
        r = self.router_losses
        self.loss_parts = {"lm_loss": loss.item(), "vision_load_balance_loss": balance.item(),
                           "vision_router_z_loss": z.item()}
        return loss + r.balance_coef * balance + r.z_coef * z

    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.loss_parts: dict[str, float] = {}
        loss = self._loss(batch)
        return loss, {"truncated": float(batch["num_truncated"]), "samples": float(len(batch["input_ids"])),
                      "empty": float(batch["num_targets"] == 0), **self.loss_parts}

    def _step_metrics(self, micro: list[dict[str, float]]) -> dict[str, float]:
        self.truncated += int(sum(m["truncated"] for m in micro))
        self.samples_seen += int(sum(m["samples"] for m in micro))
        self.empty_batches += int(sum(m["empty"] for m in micro))
        step_loss = sum(m["loss"] for m in micro) / len(micro)
        if len(self.first_losses) < LOSS_WINDOW:
            self.first_losses.append(step_loss)
        self.last_losses.append(step_loss)
        values = {"loss": step_loss, "learning_rate": self.scheduler.get_last_lr()[0]}
        if self.router_losses is not None:  # summed over the ranks by the loop: their mean
            ranks = self.accelerator.num_processes
            for name in ROUTER_LOSS_PARTS:
                values[name] = sum(m[name] for m in micro) / len(micro) / ranks
            values["vision_tower_learning_rate"] = self.scheduler.get_last_lr()[-1]
        return values

    def _log_values(self, steps: list[dict[str, float]]) -> dict[str, float]:
        values = {"loss": _mean([s["loss"] for s in steps]), "learning_rate": steps[-1]["learning_rate"],
                  "epoch": self.batches_done / self.sampler.batches_per_epoch,
                  "samples_seen": float(self.samples_seen), "truncated_samples": float(self.truncated),
                  "empty_batches": float(self.empty_batches)}
        if self.router_losses is not None:  # every rank runs this at the same steps: the tally's sum is collective
            values.update({name: _mean([s[name] for s in steps]) for name in ROUTER_LOSS_PARTS})
            values["vision_tower_learning_rate"] = steps[-1]["vision_tower_learning_rate"]
            values.update(self.router_losses.routing_values(self.accelerator))
        return self.lr_change.note(values)

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
        if isinstance(getattr(self.trained.model.get_model(), "vision_tower", None), list):  # kept out of the engine
            require_finite_weights(self.trained.model.get_vision_tower(), f"--vision_tower {m.vision_tower}")

    def _save_last_step(self) -> None:
        """With checkpoints on, save the last step too before the final output is written (an HF Trainer saves it
        as well): a run killed while writing the output then resumes there and only writes it, instead of
        training again every step since the last --save_steps checkpoint."""
        last = self.checkpoints.latest()
        if self.plan.save_every and (last is None or last.name != self.checkpoints.path(self.step).name):
            self.save_checkpoint()

    def _write_final_output(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = full_state_dict(acc, self.model)  # every rank: a collective under ZeRO-3 and FSDP2
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)

            def write(tmp: Path) -> None:
                self.output.write(model, self.trained.tokenizer, tmp, weights, final=self.output_dir.resolve())
                (tmp / ARGS_FILE).write_text(json.dumps(self.args.as_dict(), indent=1) + "\n")

            publish(write, self.output_dir)
        acc.wait_for_everyone()


ROUTER_LOSS_PARTS = ("lm_loss", "vision_load_balance_loss", "vision_router_z_loss")


def _optimizer(model, args: LlavaArguments) -> torch.optim.AdamW:
    """AdamW over the weights that train (decay on matrices only, as `adamw`); a tower that trains gets its own two
    groups at --mm_vision_tower_lr (default --learning_rate), last, so the schedule scales both rates alike."""
    t = args.training
    params = [p for p in model.parameters() if p.requires_grad]
    if not trains_tower(args):
        return adamw(params, t.learning_rate, t.weight_decay)
    in_tower = {id(p) for p in model.get_vision_tower().parameters()}
    groups = []
    for lr, part in ((t.learning_rate, [p for p in params if id(p) not in in_tower]),
                     (t.mm_vision_tower_lr or t.learning_rate, [p for p in params if id(p) in in_tower])):
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": t.weight_decay, "lr": lr},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW(groups, lr=t.learning_rate)


class RouterLosses:
    """The routers of a MoE tower that trains: asks the tower for its router logits in every forward (LLaVA's
    tower interface returns features only, so a hook on the CLIP-MoE model adds `output_router_logits=True` and
    keeps what it returns), turns them into the load-balance and z losses of `encoder.moe.routing_losses` and
    counts the routing per MoE layer in a `RoutingTally` between metrics lines.

    The logits of all tower calls of a micro-batch (one per image under anyres with lists) are joined per layer
    first, so the losses are those of one call on all of its images."""

    def __init__(self, model, balance_coef: float, z_coef: float):
        config = model.config
        self.top_k, self.balance_coef, self.z_coef = config.top_k, balance_coef, z_coef
        self.layers = list(config.moe_layers)
        # The losses of the routers that train (the blocks past the selected hidden state stay frozen); the tally
        # counts every MoE layer.
        blocks = model.encoder.layers
        self.trained_slots = [slot for slot, layer in enumerate(self.layers)
                              if blocks[layer].mlp.router.weight.requires_grad]
        self.num_experts = config.num_experts
        self.tally: RoutingTally | None = None  # made on the device of the first logits (the engine's)
        self.calls: list[tuple[torch.Tensor, ...]] = []
        model.register_forward_pre_hook(self._ask, with_kwargs=True)
        model.register_forward_hook(self._keep)

    @classmethod
    def of(cls, llava_model, args: LlavaArguments) -> RouterLosses | None:
        """The router losses of `llava_model`'s tower, or None for a dense tower (it has no routers)."""
        inner = getattr(llava_model.get_vision_tower(), "vision_tower", None)
        config = getattr(inner, "config", None)
        if not getattr(config, "moe_layers", None):
            return None
        m = args.model
        balance = config.aux_loss_coef if m.balance_loss_coef is None else m.balance_loss_coef
        z = config.router_z_loss_coef if m.router_z_loss_coef is None else m.router_z_loss_coef
        return cls(inner, balance, z)

    @staticmethod
    def _ask(module, args, kwargs):
        return args, {**kwargs, "output_router_logits": True}

    def _keep(self, module, args, output) -> None:
        logits = getattr(output, "router_logits", None)
        if logits is not None:
            self.calls.append(tuple(logits))

    def clear(self) -> None:
        self.calls = []

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balance loss, z-loss) of the calls since `clear`, each the mean over the MoE layers that train (as
        the tower's own `aux_loss` over its layers); zeros when there are none or the tower did not run. Every MoE
        layer's routing is counted in the tally."""
        calls, self.calls = self.calls, []
        zero = torch.zeros(())
        if not calls:
            return zero, zero
        per_layer = [torch.cat(layer) for layer in zip(*calls)]
        with torch.no_grad():
            if self.tally is None:
                self.tally = RoutingTally(self.layers, self.num_experts, self.top_k, per_layer[0].device)
            if all(torch.isfinite(logits).all() for logits in per_layer):  # else the loop stops on the loss
                self.tally.add([logits.detach() for logits in per_layer])
        if not self.trained_slots:
            return zero, zero
        terms = [routing_losses(per_layer[slot], self.top_k) for slot in self.trained_slots]
        return torch.stack([b for b, _ in terms]).mean(), torch.stack([z for _, z in terms]).mean()

    def routing_values(self, accelerator) -> dict[str, float]:
        """Per MoE layer since the last call, over all ranks (a collective): the usage balance (entropy of the
        experts' shares / log E, 1 = even), the mean router entropy / log E and the busiest expert's share."""
        if self.tally is None:
            self.tally = RoutingTally(self.layers, self.num_experts, self.top_k, accelerator.device)
        if accelerator.num_processes > 1:
            self.tally.reduce(lambda t: accelerator.reduce(t, reduction="sum"))
        values = {}
        for layer in self.tally.summary()["layers"]:
            key = f"vision_routing/layer_{layer['layer']}"
            values[f"{key}/usage_balance"] = layer["usage_entropy_norm"]
            values[f"{key}/router_entropy_norm"] = layer["router_entropy_norm"]
            values[f"{key}/top_expert_fraction"] = max(layer["expert_fraction"])
        self.tally = RoutingTally(self.layers, self.num_experts, self.top_k, self.tally.choices.device)
        return values


def _keep_tower_whole(model, device) -> None:
    """LLaVA's own rule for sharded training (its train.py does this under FSDP): the frozen vision tower is held
    in a list, outside the module tree, so ZeRO-3 and FSDP2 neither partition nor wrap it; every rank keeps it
    whole and runs it as it is. LLaVA's `get_vision_tower()` unpacks the list; the saved config still names
    `mm_vision_tower`, and the tower's weights were never part of the output."""
    inner = model.get_model()
    tower = inner.vision_tower
    if isinstance(tower, list):
        return
    del inner.vision_tower
    inner.vision_tower = [tower.to(device)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
