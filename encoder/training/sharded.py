"""What the loop does differently under engines that shard the training state over the ranks.

DeepSpeed ZeRO-1/2 shard the optimizer state, ZeRO-3 and FSDP2 the parameters as well. For all of them:

- a checkpoint holds the engine's own state, written by every rank (`accelerator.save_state`: DeepSpeed's
  checkpoint, or torch's distributed checkpoint under FSDP2), so a resume restores the sharded optimizer
  exactly, plus the trainer's usual files, written by the main process from the gathered full weights, so
  every checkpoint stays usable as it is;
- the final output is written from the same gathered weights (`full_state_dict`), whatever the engine;
- the engine's config gets what this loop decides itself (micro-batch, clipping, buckets), so "auto" in
  LLaVA's zero2.json / zero3.json resolves the way an HF Trainer would resolve it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from ..utils.errors import UserError, first_line

ENGINE_DIR = "engine"  # inside a checkpoint: the engine's sharded state (one part per rank)
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written by every rank; renamed into place when complete
SCHEDULER_FILE = "scheduler.pt"  # not prepared by accelerate (it would step once per process), so saved here


def engine_of(accelerator) -> str:
    """'ddp' (also one process), 'deepspeed-zeroN' or 'fsdp2'."""
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED":
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == "FSDP":
        return "fsdp2"
    return "ddp"


def is_sharded(accelerator) -> bool:
    """Whether the engine holds part of the training state on each rank (then every rank saves and loads)."""
    return engine_of(accelerator) != "ddp"


def shards_parameters(accelerator) -> bool:
    """ZeRO-3 and FSDP2: no rank holds the whole model while it trains."""
    return engine_of(accelerator) in ("deepspeed-zero3", "fsdp2")


def configure_deepspeed(accelerator, module: nn.Module, micro_batch: int, max_grad_norm: float) -> None:
    """Fill what a DeepSpeed config leaves to the trainer ("auto" or absent) from this loop's own settings.

    accelerate resolves the micro-batch only from a prepared DataLoader (this loop keeps its own batch plan),
    clipping happens inside the engine (accelerate's `clip_grad_norm_` does nothing under DeepSpeed, and
    DeepSpeed's default is 1.0 whatever --max_grad_norm says), the bucket sizes follow the model's hidden size
    (which accelerate looks for only on the top module), and ZeRO-3 must be able to gather the weights the
    loop writes. What the config sets itself was checked against the run before anything was built
    (`deepspeed_config.check_launch`)."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if config.get("gradient_clipping", "auto") == "auto":  # any other value agrees (deepspeed_config.check_launch)
        config["gradient_clipping"] = max_grad_norm
    zero = config.setdefault("zero_optimization", {})
    hidden = max((getattr(getattr(m, "config", None), "hidden_size", 0) or 0 for m in module.modules()), default=0)
    if hidden:
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def engine_input_dtype(accelerator) -> torch.dtype | None:
    """The dtype float inputs (images) must arrive in, as an HF Trainer casts them: under DeepSpeed with bf16 or
    fp16 on (by --bf16 / --fp16 or by the config), the engine holds the whole model in that dtype and nothing
    autocasts (accelerate turns its autocast off under DeepSpeed), so fp32 images would meet bf16 weights. None:
    the inputs stay as they are (other engines autocast)."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on the CPU of the main process (other ranks may get an empty dict).

    Collective under ZeRO-3 and FSDP2: every rank must call it. Keys are the unwrapped model's."""
    if shards_parameters(accelerator):
        state = accelerator.get_state_dict(model)
    else:
        state = accelerator.unwrap_model(model).state_dict()
    return {k: v.detach().cpu() for k, v in state.items()} if accelerator.is_main_process else {}


def whole_numel(p: torch.Tensor) -> int:
    """Elements of the whole weight, also for a ZeRO-3 partitioned one (whose own numel() is 0 outside forward)."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def parameters_held(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model), from the engine's own records: DeepSpeed's
    partition (`ds_tensor`) under ZeRO-3, the local shard of each DTensor under FSDP2, else the tensors."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held, total = held + p.ds_tensor.numel(), total + whole_numel(p)
        elif hasattr(p, "to_local"):
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held, total


def local_shards_finite(model: nn.Module) -> bool:
    """Whether the part of every weight this rank holds is finite (the whole weight outside ZeRO-3 / FSDP2)."""
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
        if local.numel() and not torch.isfinite(local.detach()).all():
            return False
    return True


def optimizer_state_held(optimizer) -> int:
    """Elements of optimizer state (Adam's moments) this rank holds: the innermost torch optimizer's state, under
    accelerate's and DeepSpeed's wrappers (DeepSpeed keeps the state of this rank's flat partition there)."""
    inner, seen = optimizer, set()
    while hasattr(inner, "optimizer") and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.optimizer
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if torch.is_tensor(value) and value.ndim > 0:
                total += (value.to_local() if hasattr(value, "to_local") else value).numel()
    return total


def peak_memory_mib() -> float:
    """This process's peak resident memory (ru_maxrss, KiB on Linux) in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CheckpointedLoop(Protocol):
    """What a checkpoint state reads from the loop it saves (`loop.TrainingLoop` is one), so this module needs no
    import of the loop, which imports it: the trainer's hooks for its files and record, and where the loop is."""

    accelerator: Any
    model: nn.Module
    scheduler: Any
    checkpoints: Any  # loop.CheckpointDir
    plan: Any  # loop.LoopPlan

    def position(self) -> dict[str, Any]: ...

    def _write_trained(self, directory: Path, weights: dict[str, torch.Tensor]) -> None: ...

    def _record(self) -> dict[str, Any]: ...


class ShardedCheckpointState:
    """`CheckpointState` for sharded engines: `save` and `load` run on every rank.

    A checkpoint is written into `<name>.partial/` (the same path on every rank), the engine's state first
    (every rank), then the trainer's files and the schedule (main), the state file last, and renamed into place
    by the main process: a run killed at any point leaves no directory that a resume takes for complete."""

    def __init__(self, loop: CheckpointedLoop):
        self.loop = loop

    def save(self, final: Path) -> None:
        loop, acc = self.loop, self.loop.accelerator
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial / ENGINE_DIR))
        acc.wait_for_everyone()  # every rank's part is on disk before anything marks the checkpoint complete
        weights = full_state_dict(acc, loop.model)
        if acc.is_main_process:
            loop._write_trained(partial, weights)
            torch.save(loop.scheduler.state_dict(), partial / SCHEDULER_FILE)
            record = {**loop.position(), **loop._record()}
            (partial / loop.checkpoints.state_file).write_text(json.dumps(record, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            loop.checkpoints.prune(loop.plan.save_total_limit)
        acc.wait_for_everyone()

    def load(self, directory: Path) -> dict[str, Any]:
        loop, acc = self.loop, self.loop.accelerator
        record = json.loads((directory / loop.checkpoints.state_file).read_text())
        engine = record.get("engine", "ddp")
        if engine != engine_of(acc) or not (directory / ENGINE_DIR).is_dir():
            raise UserError(f"{directory} was written under {engine}, this run uses {engine_of(acc)}; resume "
                            "under the engine that wrote it (the sharded optimizer state is the engine's own)")
        try:
            acc.load_state(str(directory / ENGINE_DIR))
            loop.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, map_location="cpu",
                                                      weights_only=True))
            failure = None
        except UNREADABLE as err:
            failure = err
        _refuse_damaged(acc, directory, failure, loop.checkpoints.all())
        return record


# What reading a truncated or overwritten engine part raises, by reader: torch's distributed checkpoint collects
# every rank's failure into a CheckpointException (a BaseException) on all ranks; DeepSpeed's and accelerate's
# torch.load raise RuntimeError ("failed finding central directory"), UnpicklingError, EOFError; a missing or
# unexpected entry KeyError, IndexError, ValueError or DeepSpeed's own asserts; overwritten bytes the unpickler reads
# as a huge length, MemoryError (the allocation is refused, nothing was allocated).
UNREADABLE = (CheckpointException, OSError, RuntimeError, ValueError, EOFError, KeyError, IndexError, AssertionError,
              pickle.UnpicklingError, MemoryError)


def _refuse_damaged(acc, directory: Path, failure: BaseException | None, complete: list[Path]) -> None:
    """Stop every rank together, with one line naming the checkpoint and the way out, when any rank could not
    read its part: DeepSpeed reads each rank's shard alone, so the ranks that could read theirs would otherwise
    go on to the next collective and die there on the lost peer, every rank with a traceback."""
    failed = torch.zeros(acc.num_processes, device=acc.device)
    if isinstance(failure, CheckpointException):  # raised on every rank, naming the ranks that failed
        for rank in failure.failures:
            failed[rank] = 1
        failure = next(iter(failure.failures.values()))[0] if failure.failures else failure
    elif failure is not None:
        failed[acc.process_index] = 1
    if acc.num_processes > 1:
        failed = acc.reduce(failed, reduction="sum")
    ranks = [rank for rank, bad in enumerate(failed.tolist()) if bad]
    if not ranks:
        return
    # The reader's first sentence: torch's goes on to advise on how files get corrupted (or weights_only=False).
    detail = f": {first_line(failure, with_type=True).split('. ')[0].rstrip('.')}" if failure is not None else ""
    earlier = [p for p in complete if p.resolve() != directory.resolve()]
    then = f"the run resumes from {earlier[-1]}" if earlier else "no earlier checkpoint is kept, so the run starts over"
    raise UserError(f"checkpoint {directory} is damaged: the engine state in its {ENGINE_DIR}/ cannot be read by "
                    f"rank(s) {', '.join(map(str, ranks))}{detail}; delete {directory} and run the same command "
                    f"again ({then})")
