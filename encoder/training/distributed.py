"""The process group and engine of a run, however it was launched (python, torchrun, accelerate launch,
deepspeed): DDP, DeepSpeed ZeRO-1/2/3 or FSDP2, on GPUs or on CPU processes over gloo.

accelerate only forms a CPU process group (gloo) when told the run is on the CPU; otherwise processes
started by torchrun on a machine without GPUs would each train alone, silently. Every entry point asks for
the state through `process_state()` before creating an Accelerator, so CPU runs join their group too.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..utils.errors import UserError
from .deepspeed_config import LoopOwned, check_launch
from .run_guard import watch_launcher

# What `accelerate launch --use_deepspeed / --use_fsdp` (or its config file) asks for, through the environment.
ENGINE_REQUESTS = {"ACCELERATE_USE_DEEPSPEED": ("DeepSpeed", "DEEPSPEED", "--use_deepspeed"),
                   "ACCELERATE_USE_FSDP": ("FSDP", "FSDP", "--use_fsdp")}


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def process_state():
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())


def make_accelerator(mixed_precision: str = "no", deepspeed_config: str | None = None, loop: LoopOwned | None = None,
                     **kwargs):
    """An Accelerator that has joined the process group and runs the engine the launch asked for; kwargs go to
    `Accelerator` (e.g. gradient accumulation).

    accelerate runs DeepSpeed and FSDP only on GPUs; both also run on CPU processes over gloo (DeepSpeed with
    its CPU accelerator, torch's FSDP2 as it is), so a launch that asks for them on a CPU machine gets them
    here, and the 2-process CPU tests exercise the code a GPU cluster runs.

    `deepspeed_config`: a DeepSpeed JSON named by the run's own flags (LLaVA's `--deepspeed`), which turns
    DeepSpeed on under any launcher, as in an HF Trainer; it must agree with `accelerate launch
    --deepspeed_config_file` if that was given too.

    `loop`: what the training loop decides from the run's flags (its accumulation, which the Accelerator gets
    too): a launch or DeepSpeed config that contradicts it is refused here, before anything is built."""
    from accelerate import Accelerator

    watch_launcher()  # a worker ends with its launcher rather than train on as an orphan
    if deepspeed_config is not None:
        _ask_for_deepspeed(deepspeed_config)
    asked = requested_engine()
    name = asked[0] if asked is not None else None
    if name == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("accelerate launch --use_deepspeed: DeepSpeed is not installed here; pip install "
                        "'clip-moe-toolkit[deepspeed]' (or deepspeed), or launch without --use_deepspeed to train "
                        "with DDP")
    if loop is not None:
        check_launch(loop)
        kwargs.setdefault("gradient_accumulation_steps", loop.accumulation)
    if name == "FSDP" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("accelerate launch --use_fsdp: only FSDP2 is supported (torch's fully_shard, whose "
                        "checkpoints this loop saves and resumes exactly); add --fsdp_version 2")
    cpu = on_cpu()
    if cpu:
        # DeepSpeed's CPU accelerator, said rather than detected: detection logs a warning on every CPU run where
        # DeepSpeed is installed, whether or not it trains.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if name == "DeepSpeed":
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "false"  # see _build_models_whole
    if name == "DeepSpeed" and cpu:
        _deepspeed_on_cpu()
        cpu = False  # accelerate's DeepSpeed path, with DeepSpeed's CPU accelerator and gloo underneath
    else:
        process_state()
    _forget_earlier_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    if accelerator.distributed_type.name == "DEEPSPEED":
        _build_models_whole()
    if name == "FSDP" and accelerator.distributed_type.name == "MULTI_CPU":
        _fsdp_on_cpu(accelerator)
    check_engine(accelerator, asked)
    return accelerator


def _ask_for_deepspeed(config: str) -> None:
    launched = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launched and os.path.realpath(launched) != os.path.realpath(config):
        raise UserError(f"--deepspeed {config} differs from accelerate launch --deepspeed_config_file {launched}; "
                        "pass one config")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = config


def _build_models_whole() -> None:
    """accelerate hands its DeepSpeed config to transformers, whose from_pretrained then builds every model under
    zero.Init, partitioned as it loads, on all ranks at once: a model that one rank builds alone (an evaluation on
    the main process) deadlocks, and LLaVA's frozen vision tower arrives partitioned, though it is meant to stay
    whole outside the engine. Models are built whole instead, and partitioned by the engine when it is made."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _deepspeed_on_cpu() -> None:
    """Join the process group through DeepSpeed on gloo, with DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu)."""
    from accelerate import PartialState

    PartialState(cpu=False, backend="gloo")


def _fsdp_on_cpu(accelerator) -> None:
    """Make a MULTI_CPU accelerator an FSDP2 one: accelerate decides FSDP only when it sees GPUs, but its FSDP2
    preparation (fully_shard per layer, then the root) and torch's sharded checkpoints work on gloo alike."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings, like accelerate does on GPUs
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    accelerator.state.fsdp_plugin = plugin


def requested_engine() -> tuple[str, str, str] | None:
    """(name, accelerate's DistributedType name, launch flag) of the sharding engine the launch asked for."""
    for variable, engine in ENGINE_REQUESTS.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            return engine
    return None


def check_engine(accelerator, asked: tuple[str, str, str] | None) -> None:
    """Refuse to train with another engine than the one the launch asked for: accelerate falls back to one
    process or DDP without a word (e.g. --use_fsdp with one process), and the result would not be what the
    command line says."""
    actual = accelerator.distributed_type.name
    if asked is not None and actual != asked[1]:
        raise UserError(f"accelerate was launched with {asked[2]} but runs this as {actual}; launch {asked[0]} "
                        f"with --num_processes 2 or more, or launch without {asked[2]}")


def _forget_earlier_precision(mixed: str) -> None:
    """accelerate fixes one precision per process and refuses another; a second run in the same process (the
    embedded `finetune` runs stage 1 first, in fp32 unless told otherwise; DMU's stages after a bf16 run in a
    notebook) may need another one. Only the accelerator's state is reset; the process group (PartialState)
    stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()


def leave_process_group() -> None:
    """Once every rank is done (a barrier), leave the process group while the interpreter is fully alive.

    A finished FSDP2 run on gloo was seen to abort at exit, by chance, on a loaded machine (rank 1: "terminate
    called without an active exception", SIGABRT). The group's gloo backend then still ran its threads (2 workers,
    1 transport loop) into the interpreter's finalization, where C++ threads meet a dying interpreter; here they
    are joined first, with Python fully alive. Only for runs that succeeded: after an error, peers may still wait
    in a collective, which a barrier or destroy would hang on.

    destroy_process_group alone does not end gloo's threads after an FSDP2 run: it only forgets the group, whose
    C++ backend (with its worker and transport threads) lives as long as a Python reference to it, and torch's
    DTensor caches keep FSDP2's DeviceMesh, which holds the group, for the life of the process (see
    `_release_device_meshes`). So those references go first; the group is then freed, and its threads joined, by
    destroy_process_group itself, here, with the interpreter fully alive. A function's default argument can hold
    the group as well (`_release_default_arguments`): DeepSpeed's, imported under accelerate's FSDP2 too."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    _release_device_meshes()
    _release_default_arguments(dist.distributed_c10d._world.pg_map)
    gc.collect()  # the run's models and their FSDP2 state, left in reference cycles, let go of the mesh too
    dist.destroy_process_group()


# torch's DTensor caches that hold a DeviceMesh (through a DTensorSpec, a planner or a topology) beyond the model
# that used it, as (module, attribute path to a function with cache_clear, or to a function that clears). All
# private, so each is cleared only where this torch has it. Measured on torch 2.14 (a 1-process gloo FSDP2 run):
# without the sharding propagation, planner, transform or topology cache cleared, the group's threads outlive
# destroy_process_group.
_MESH_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # the Python and the C++ fast-path caches
    ("torch.distributed.tensor._sharding_prop", "ShardingPropagator._propagate_tensor_meta_cached.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def _release_default_arguments(groups) -> None:
    """Drop the process groups `groups` from functions' default arguments, for None (the default group, in
    torch.distributed's calls). A default is evaluated once, at definition: DeepSpeed's `TorchBackend.barrier(self,
    group=torch.distributed.GroupMember.WORLD, ...)` (deepspeed/comm/torch.py), imported once the group exists,
    holds the world group for the life of the process, so destroy_process_group cannot free it and gloo's threads
    run on into the interpreter's finalization. The groups are about to be destroyed: a default naming one could
    not be used again anyway."""
    import gc
    import types

    import torch.distributed as dist

    doomed = {id(group) for group in groups}

    def stale(value) -> bool:
        return isinstance(value, dist.ProcessGroup) and id(value) in doomed

    for function in gc.get_objects():  # functions are tracked by the collector, so all of them are listed
        if type(function) is not types.FunctionType:
            continue
        if function.__defaults__ and any(stale(value) for value in function.__defaults__):
            function.__defaults__ = tuple(None if stale(value) else value for value in function.__defaults__)
        if function.__kwdefaults__ and any(stale(value) for value in function.__kwdefaults__.values()):
            function.__kwdefaults__ = {key: None if stale(value) else value
                                       for key, value in function.__kwdefaults__.items()}


def _release_device_meshes() -> None:
    """Empty torch's DTensor caches (`_MESH_CACHES`; the sharding propagation cache is per thread: this one's,
    where the loop's DTensor ops ran), so they no longer keep a DeviceMesh, and with it its process groups, alive.
    They refill on the next DTensor op (an embedded run that trains again), at the cost of recomputing them."""
    import importlib

    for module_name, path in _MESH_CACHES:
        try:
            target = importlib.import_module(module_name)
            for name in path.split("."):
                target = getattr(target, name)
        except (ImportError, AttributeError):
            continue  # another torch: not there
        target()
