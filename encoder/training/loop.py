"""The one training loop both trainers run (contrastive CLIP / CLIP-MoE in upcycle, LLaVA in mllm_bridge).

A trainer subclasses `TrainingLoop` and says only what is its own: what a micro-batch's forward computes
(`_forward`), how the numbers of a step are logged (`_step_metrics`), what its checkpoints hold besides the
optimizer (`_write_trained` / `_read_trained`, `_record` / `_restore`) and which settings a resume must share
(`_refuse_changed_settings`). Everything else is here, once:

- batches from a `ClusterBatchSampler`-like plan (the same global batches on every rank, each rank its share),
  so a resumed run skips exactly the micro-batches already trained on;
- gradient accumulation through `accelerator.accumulate` (no gradient all-reduce before the last micro-batch;
  accelerate divides the loss by the accumulation, and under DeepSpeed the engine does both);
- each micro-batch's random numbers (dropout) drawn from the global generator seeded by (seed, micro-batch,
  rank), so a resumed run draws what the uninterrupted one drew without any RNG state in the checkpoint;
- clipping, AdamW step, schedule step; one all-reduce per micro-batch that both stops every rank on a
  non-finite loss and sums the counts the trainer asks for;
- checkpoints written atomically by `CheckpointState` (or, under DeepSpeed and FSDP2, by every rank through
  `sharded.ShardedCheckpointState`), the newest `save_total_limit` kept, and an exact resume;
- the run log (metrics.jsonl without the steps a resumed run replays) and the progress bar.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils.errors import TrainingDiverged, UserError
from ..utils.files import atomic_output_dir, remove_stale_siblings
from ..utils.options import show
from ..utils.step_record import SettingsChanged, differences
from .run_guard import RunLock
from .run_log import NullLog, RunLog
from .sampler import endless_batches
from .sharded import (
    PARTIAL_SUFFIX,
    ShardedCheckpointState,
    configure_deepspeed,
    engine_input_dtype,
    engine_of,
    full_state_dict,
    is_sharded,
    local_shards_finite,
    optimizer_state_held,
    parameters_held,
    peak_memory_mib,
    shards_parameters,
)

OPTIMIZER_FILE = "optimizer.pt"  # {"optimizer": ..., "scheduler": ...}, the same in both trainers' checkpoints


def adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and norm scales (ndim < 2) are not pulled to zero."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def refuse_changed_settings(path: Path, recorded: dict[str, Any], wanted: dict[str, Any], fix: str,
                            note: str = "") -> None:
    """Raise SettingsChanged naming, in one line, every setting in which checkpoint `path` differs from this run."""
    changed = differences(recorded, wanted)
    if changed:
        raise SettingsChanged(f"{path} belongs to a run with other settings ({'; '.join(changed)}){note}; {fix}")


@dataclass(frozen=True)
class CheckpointDir:
    """Where a run's checkpoints live: `<root>/<prefix><step>/`, complete once `state_file` is in it."""

    root: Path
    prefix: str
    state_file: str

    def path(self, step: int) -> Path:
        return self.root / f"{self.prefix}{step}"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        n = len(self.prefix)
        found = [p for p in self.root.glob(f"{self.prefix}*") if p.name[n:].isdigit() and (p / self.state_file).is_file()]
        return sorted(found, key=lambda p: int(p.name[n:]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def prune(self, keep: int | None) -> None:
        """Delete all but the newest `keep` checkpoints (None or 0: keep all)."""
        for old in self.all()[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def remove_partial(self) -> list[Path]:
        """Delete what killed saves left, whatever their step: sharded `<prefix>N.partial/` folders and the
        atomic writer's `.<prefix>N.tmp-*` / `.old-*` siblings of dead writers (for a real model, tens of GB each;
        a resume with another save interval never writes that step again to replace them). Run by the main process
        before any rank saves: a sharded partial is only ever written by a live run of this directory, which
        `run_guard` rules out beside this one."""
        n, removed = len(self.prefix), []
        for path in self.root.glob(f"{self.prefix}*{PARTIAL_SUFFIX}"):
            if path.name[n:-len(PARTIAL_SUFFIX)].isdigit():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        steps = {p.name[1 + n:].split(".", 1)[0] for p in self.root.glob(f".{self.prefix}*.*-*")}
        for step in sorted(s for s in steps if s.isdigit()):
            removed += remove_stale_siblings(self.path(int(step)))
        return removed


@dataclass
class LoopPlan:
    """How long to train and when to log and save; each trainer fills it from its own flags."""

    total_steps: int
    accumulation: int  # micro-batches per optimizer step
    max_grad_norm: float  # 0: no clipping
    save_every: int  # optimizer steps between checkpoints; 0: none before the end
    save_total_limit: int | None  # checkpoints kept; None or 0: all
    log_every: int  # optimizer steps per metrics line
    desc: str  # progress bar and run name
    seed: int  # with the micro-batch and the rank, seeds each micro-batch's random numbers
    log_dir: Path  # TensorBoard
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    config: dict = field(default_factory=dict)  # recorded by W&B


class CheckpointState:
    """Writes and reads one checkpoint of a loop: the trainer's files for what it trains, the optimizer and the
    schedule (OPTIMIZER_FILE), then the loop's position and the trainer's record (the state file, last).

    This variant is for engines where the main process holds everything (one process, DDP): `save` runs on the
    main process only, into a temporary directory that `TrainingLoop.save_checkpoint` renames into place. Engines
    that shard the optimizer state or the parameters use `sharded.ShardedCheckpointState`, which every rank runs."""

    def __init__(self, loop: TrainingLoop):
        self.loop = loop

    def save(self, directory: Path) -> None:
        loop = self.loop
        loop._write_trained(directory, full_state_dict(loop.accelerator, loop.model))
        torch.save({"optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict()},
                   directory / OPTIMIZER_FILE)
        record = {**loop.position(), **loop._record()}
        (directory / loop.checkpoints.state_file).write_text(json.dumps(record, indent=1) + "\n")

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore the trained weights, optimizer and schedule from `directory`; return its state file."""
        loop = self.loop
        record = json.loads((directory / loop.checkpoints.state_file).read_text())
        if record.get("engine", "ddp") != "ddp":
            raise UserError(f"{directory} was written under {record['engine']}, this run uses DDP; resume under the "
                            "engine that wrote it (the sharded optimizer state is the engine's own)")
        loop._read_trained(directory)
        saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        loop.optimizer.load_state_dict(saved["optimizer"])
        loop.scheduler.load_state_dict(saved["scheduler"])
        return record


class TrainingLoop:
    """Trains `module` (prepared here with `optimizer`, which holds its weights that require grad) on `dataset`
    in the order `sampler` plans.

    Subclasses set the class attributes that word the divergence stop for their flags, and implement the hooks
    below. `source`: how messages name the starting weights.
    """

    lr_flag = "--lr"
    suspects = "the data"  # what to check when the loss is not finite before any update
    unstable_fix = "restart with a lower --lr"  # when the checkpoint a run resumed from is already unstable
    # The flags that make a run of the same command resume at a lower rate (lower_lr.FIELD), or None where the
    # command offers none: then the stop advises `unstable_fix`.
    lower_lr_resume: str | None = None

    def __init__(self, accelerator, module: nn.Module, optimizer, scheduler, dataset: Dataset, sampler, collate_fn, num_workers: int, plan: LoopPlan,
                 checkpoints: CheckpointDir, source: str):
        self.accelerator, self.plan, self.checkpoints, self.source = accelerator, plan, checkpoints, source
        self.sampler = sampler
        cuda = accelerator.device.type == "cuda"
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                                 pin_memory=cuda)
        # Not prepared: accelerate would step a prepared schedule once per process.
        self.scheduler = scheduler
        self.model = module
        if shards_parameters(accelerator):
            self._require_finite_weights()  # while every weight is still whole on every rank
        configure_deepspeed(accelerator, module, sampler.global_batch_size // accelerator.num_processes,
                            plan.max_grad_norm)
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        # What is trained and clipped, taken from the prepared model: FSDP2 replaces the parameters by sharded ones.
        self.trained_params = [p for p in accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        self.checkpoint_state = ShardedCheckpointState(self) if is_sharded(accelerator) else CheckpointState(self)
        self.engine = engine_of(accelerator)
        self.input_dtype = engine_input_dtype(accelerator)
        self.parameters_total = parameters_held(self.model)[1]
        self.memory: dict[str, list] = {}  # per rank, measured at each checkpoint (`_measure_memory`)
        self.step = 0
        self.batches_done = 0  # global micro-batches consumed, over all epochs
        self.resumed_from: Path | None = None
        self.first_step = 0  # the step this process started from (it made no update before)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def position(self) -> dict[str, Any]:
        """What every state file records besides the trainer's own: where the run is, and under which engine
        (with the parameters each rank held, as the engine counts them)."""
        return {"step": self.step, "batches_done": self.batches_done, "engine": self.engine,
                "parameters_total": self.parameters_total, **self.memory}

    def _measure_memory(self) -> None:
        """What each rank holds, by the engine's own accounting (weights, Adam's moments), and its peak resident
        memory: gathered from every rank (a collective), recorded in the state file of each checkpoint."""
        acc = self.accelerator
        mine = [float(parameters_held(self.model)[0]), float(optimizer_state_held(self.optimizer)), peak_memory_mib()]
        values = torch.tensor([mine], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            values = acc.gather(values)
        rows = values.tolist()
        self.memory = {"parameters_held_per_rank": [int(r[0]) for r in rows],
                       "optimizer_state_held_per_rank": [int(r[1]) for r in rows],
                       "peak_memory_mib_per_rank": [round(r[2], 1) for r in rows]}

    # -- the hooks a trainer implements --------------------------------------------------------------------
    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's loss on a micro-batch, and numbers to be summed over the ranks (e.g. samples seen)."""
        raise NotImplementedError

    def _step_metrics(self, micro: list[dict[str, float]]) -> dict[str, float]:
        """Account for one optimizer step (`micro`: per micro-batch, "loss" averaged over the ranks and the
        `_forward` numbers summed over them); return what the step logs."""
        raise NotImplementedError

    def _log_values(self, steps: list[dict[str, float]]) -> dict[str, float]:
        """One metrics line from the steps since the last one (default: the last step's values)."""
        return steps[-1]

    def _write_trained(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """Write what the run trains into `directory` (main process), from `weights`: the whole model's state
        dict (the unwrapped model's keys), gathered from the ranks under engines that shard it."""
        raise NotImplementedError

    def _read_trained(self, directory: Path) -> None:
        raise NotImplementedError

    def _record(self) -> dict[str, Any]:
        """What the state file holds besides the position: counters, and the settings a resume must share."""
        return {}

    def _restore(self, record: dict[str, Any]) -> None:
        pass

    def _refuse_changed_settings(self, path: Path) -> None:
        raise NotImplementedError

    def _require_finite_weights(self) -> None:
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.checkpoints.path(self.step)
        self._measure_memory()
        if is_sharded(self.accelerator):
            self.checkpoint_state.save(path)  # every rank: each writes its part of the engine's state
            return path
        if self.accelerator.is_main_process:
            with atomic_output_dir(path, overwrite=True) as tmp:
                self.checkpoint_state.save(tmp)
            self.checkpoints.prune(self.plan.save_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of this same run: trained weights, optimizer, schedule, batch position."""
        self._refuse_changed_settings(path)
        record = self.checkpoint_state.load(path)
        self.step, self.batches_done = record["step"], record["batches_done"]
        self._restore(record)
        self.resumed_from, self.first_step = path, self.step
        if self.accelerator.is_main_process:
            print(f"{self.plan.desc}: resumed from {path} (step {self.step} of {self.total_steps})")

    def _require_finite_shards(self) -> None:
        """After a sharded resume: every rank checks the part of the weights it holds; all stop together."""
        acc = self.accelerator
        bad = torch.tensor([0.0 if local_shards_finite(self.model) else 1.0], device=acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item():
            raise UserError(f"checkpoint {self.resumed_from} holds NaN or inf weights; resume from an earlier "
                            f"checkpoint or restart with a lower {self.lr_flag}")

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, resume_from: Path | None = None) -> None:
        """Train to `total_steps`, from `resume_from` when given; checkpoints as planned, none at the end."""
        acc, plan = self.accelerator, self.plan
        lock = RunLock(self.checkpoints.root)
        lock.refuse_live_holder()  # every rank, before the main process claims the directory (below)
        if resume_from is not None:
            self.resume(resume_from)
        if is_sharded(acc):
            held = [parameters_held(self.model)[0]]  # one entry per rank, also when the engine runs one process
            if acc.num_processes > 1:
                held = acc.gather(torch.tensor(held, device=acc.device)).tolist()
            if acc.is_main_process:
                print(f"{plan.desc}: {self.engine} over {acc.num_processes} processes; the ranks hold "
                      f"{', '.join(f'{n:,}' for n in held)} of the {self.parameters_total:,} parameters in the engine")
        if not shards_parameters(acc):
            self._require_finite_weights()
        elif resume_from is not None:
            self._require_finite_shards()
        # Written only now, so a run refused above leaves nothing behind; after every rank has read the lock.
        acc.wait_for_everyone()
        if acc.is_main_process:
            lock.claim()
            self.checkpoints.remove_partial()
        acc.wait_for_everyone()  # no rank saves before the leftovers are gone
        log = (RunLog(self.checkpoints.root, plan.log_dir, plan.report_to, plan.desc, plan.config, self.step)
               if acc.is_main_process else NullLog())
        bar = tqdm(total=self.total_steps, initial=self.step, desc=plan.desc, unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        self.model.train()
        batches = endless_batches(self.loader, self.sampler, self.batches_done)
        unlogged: list[dict[str, float]] = []
        try:
            while self.step < self.total_steps:
                unlogged.append(self._optimizer_step(batches))
                bar.update()
                bar.set_postfix(loss=f"{unlogged[-1]['loss']:.4f}")
                if self.step % plan.log_every == 0 or self.step == self.total_steps:
                    log.log(self.step, self._log_values(unlogged))
                    unlogged = []
                if plan.save_every and self.step % plan.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()

    def _optimizer_step(self, batches: Iterator[dict]) -> dict[str, float]:
        acc = self.accelerator
        micro = []
        for _ in range(self.plan.accumulation):
            batch = self._engine_inputs(next(batches))
            torch.manual_seed(self._micro_batch_seed())
            with acc.accumulate(self.model), acc.autocast():
                loss, numbers = self._forward(batch)
                micro.append(self._stop_or_sum(loss, numbers))
                acc.backward(loss)
            self.batches_done += 1
        if self.plan.max_grad_norm > 0:
            acc.clip_grad_norm_(self.trained_params, self.plan.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._step_metrics(micro)

    def _engine_inputs(self, batch: dict) -> dict:
        """`batch` with its float tensors in the engine's dtype (`engine_input_dtype`), the rest as it is."""
        if self.input_dtype is None:
            return batch
        return {k: v.to(self.input_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in batch.items()}

    def _micro_batch_seed(self) -> int:
        """The seed of this micro-batch's random numbers (dropout), from the run's seed, the micro-batch's place in
        the run and the rank: a resumed run draws exactly what the uninterrupted one drew, with no RNG state in
        its checkpoints. Seeded after the batch is fetched, since starting a DataLoader pass draws from the RNG."""
        parts = [self.plan.seed, self.batches_done, self.accelerator.process_index]
        return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def _stop_or_sum(self, loss: torch.Tensor, numbers: dict[str, float]) -> dict[str, float]:
        """One reduction over the processes per micro-batch: stop all of them on a non-finite loss, naming the
        loss and the ranks that had it; return the loss averaged over them and `numbers` summed.

        Each rank writes what its loss is (`NON_FINITE`'s index) into its own slot, so the sum tells every rank
        which ranks went non-finite and how, not only that one did: every rank raises the same message."""
        acc = self.accelerator
        value = loss.item()
        slots = [0.0] * acc.num_processes
        slots[acc.process_index] = float(non_finite_kind(value))
        stats = torch.tensor([*slots, value, *numbers.values()], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
        reduced = stats.tolist()
        kinds, (loss_sum, *sums) = reduced[:acc.num_processes], reduced[acc.num_processes:]
        if any(kinds):
            self._diverged(describe_non_finite(kinds))
        return {"loss": loss_sum / acc.num_processes, **dict(zip(numbers, sums))}

    def _diverged(self, loss: str) -> NoReturn:
        """Stop with what to do: `loss` says which value the reduction found (and on which ranks)."""
        last = self.checkpoints.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        at = f"the loss became {loss} at step {self.step + 1}"
        if self.step > self.first_step:
            if last is None:
                raise TrainingDiverged(f"{at}; {where}; restart with a lower {self.lr_flag}")
            if self.lower_lr_resume is None:
                raise TrainingDiverged(f"{at}; {where}; {self.unstable_fix}")
            peak = show(self.scheduler.base_lrs[0])
            raise TrainingDiverged(f"{at}; {where}; to continue from it at a lower learning rate, run the same "
                                   f"command again with {self.lower_lr_resume} and {self.lr_flag} below {peak}; "
                                   f"or {self.unstable_fix}")
        # No update yet in this process, from weights `run` found finite: the learning rate has not acted on them,
        # so the batch, the loss settings or the precision are the suspects.
        if self.resumed_from is None:
            raise TrainingDiverged(f"{at}, before any update, from the finite weights of {self.source}, so not "
                                   f"because of the learning rate: check {self.suspects}; {where}")
        raise TrainingDiverged(f"{at}, the first after resuming from {self.resumed_from}, before any update, from "
                               f"finite weights: check {self.suspects}; or the checkpoint is already unstable (too "
                               f"high a {self.lr_flag} before it): {self.unstable_fix}")


NON_FINITE = ("finite", "nan", "inf", "-inf")  # what a loss is, by index: the code each rank reduces


def non_finite_kind(value: float) -> int:
    """`value`'s index in NON_FINITE (0: finite)."""
    if math.isnan(value):
        return 1
    if math.isinf(value):
        return 2 if value > 0 else 3
    return 0


def describe_non_finite(kinds: Sequence[float]) -> str:
    """The non-finite losses in `kinds` (one NON_FINITE index per rank, as reduced): "nan" for one process,
    "nan on rank 1 of 2" or "inf on ranks 0, 3 and nan on rank 2 of 4" for several."""
    found: dict[str, list[int]] = {}
    for rank, kind in enumerate(kinds):
        if kind:
            found.setdefault(NON_FINITE[int(kind)], []).append(rank)
    if len(kinds) == 1:
        return next(iter(found))
    parts = [f"{name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
             for name, ranks in found.items()]
    return f"{' and '.join(parts)} of {len(kinds)}"
