"""One LLaVA training run from parsed flags: process group, output directory, data, model, loop, summary."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import torch

from encoder.training import make_accelerator as joined_accelerator
from encoder.training import on_cpu
from encoder.training.deepspeed_config import LoopOwned, engine_settings
from encoder.training.sharded import whole_numel
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_parent

from .arguments import LlavaArguments, accepted_only_notes, trains_tower
from .data import LlavaCollator, LlavaDataset, read_llava_samples
from .loop import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    LlavaTrainer,
    TrainResult,
    latest_checkpoint,
    refuse_changed_settings,
    run_settings,
)
from .model_setup import build_training_model, check_tower
from .outputs import TOWER_DIR, FullOutput, ProjectorOutput, output_for
from .projector import PROJECTOR_FILE

# Removed by --overwrite_output_dir besides the checkpoints: the old run's logs, and the config.json that marks
# its output as finished (the other output files are replaced when the new run publishes its own).
STALE_ON_OVERWRITE = ("metrics.jsonl", "logs", "config.json")


def make_accelerator(args: LlavaArguments):
    """An Accelerator in the launch's process group (gloo on CPUs), with the run's precision and accumulation.

    Precision is checked here, before anything is loaded or written: --bf16 True on hardware that cannot run
    bf16 stops with one line instead of failing (or silently running fp32) later.
    """
    t = args.training
    cuda = torch.cuda.is_available() and not on_cpu()
    if t.fp16 and not cuda:
        raise UserError("--fp16 needs a GPU; drop it (or use --bf16) on the CPU")
    if t.bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"--bf16 True: the GPU {torch.cuda.get_device_name()} has no bf16 support; pass --bf16 False "
                        "(or --fp16 True)")
    if t.bf16 and not cuda and not cpu_runs_bf16():
        raise UserError("--bf16 True: this CPU cannot run bf16 autocast (a bf16 matmul failed or was wrong); pass "
                        "--bf16 False to train in fp32")
    bf16 = t.bf16 if t.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    mixed = "fp16" if t.fp16 else "bf16" if bf16 else "no"
    if t.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return joined_accelerator(mixed, deepspeed_config=deepspeed_config(args), loop=LoopOwned(
        accumulation=t.gradient_accumulation_steps, batch=t.per_device_train_batch_size, max_grad_norm=t.max_grad_norm,
        precision=mixed, accumulation_flag="--gradient_accumulation_steps", batch_flag="--per_device_train_batch_size",
        clipping_flag="--max_grad_norm", precision_flag="--fp16" if t.fp16 else "--bf16",
        optimizer_flags="--learning_rate, --weight_decay",
        schedule_flags="--lr_scheduler_type, --warmup_ratio, --warmup_steps"))


def cpu_runs_bf16() -> bool:
    """Whether a bf16 matmul under CPU autocast runs and agrees with fp32 to bf16 precision.

    Asked of the CPU itself rather than read from its flags: torch emulates bf16 where AVX512-BF16 / AMX are
    missing (slower, still correct), and some builds or platforms cannot run it at all.
    """
    a = torch.linspace(-1, 1, 64).reshape(8, 8)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = a @ a.T
    except RuntimeError:
        return False
    return out.dtype == torch.bfloat16 and torch.allclose(out.float(), a @ a.T, rtol=2e-2, atol=2e-2)


def _precision_notes(args: LlavaArguments, accelerator) -> list[str]:
    t, notes = args.training, []
    if accelerator.device.type == "cpu":
        if t.tf32:
            notes.append("--tf32 True only affects matmuls on NVIDIA GPUs (Ampere and newer); on the CPU it changes "
                         "nothing")
        if accelerator.mixed_precision == "bf16" and not _native_cpu_bf16():
            notes.append("--bf16 True: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so torch emulates "
                         "them; expect bf16 to run slower than fp32 here")
    return notes


def _native_cpu_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def prepare_wandb(args: LlavaArguments) -> list[str]:
    """Make --report_to wandb work without an account or network: with no API key set up and WANDB_MODE unset,
    W&B logs offline into OUTPUT_DIR/wandb (`wandb sync` uploads it later) instead of asking to log in or
    failing. Returns the note saying so. Every process sets the same mode; only the main one logs."""
    targets = set(args.training.report_to)
    if not targets & {"wandb", "all"}:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--report_to wandb needs the wandb package; install it or use --report_to tensorboard") from None
    if os.environ.get("WANDB_MODE") or _wandb_api_key_set_up():
        return []
    os.environ["WANDB_MODE"] = "offline"
    where = Path(args.training.output_dir) / "wandb"
    return [f"--report_to wandb: no W&B API key (WANDB_API_KEY or `wandb login`), so WANDB_MODE=offline: the run is "
            f"logged under {where}; upload it later with `wandb sync`"]


def _wandb_api_key_set_up() -> bool:
    """WANDB_API_KEY, or a `wandb login` entry in ~/.netrc (for WANDB_BASE_URL's host); never asks the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def frozen_dtype(accelerator) -> torch.dtype:
    """The dtype of modules that never train: the autocast dtype (it halves their memory), else float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def prepare_run(args: LlavaArguments) -> tuple[LlavaTrainer, Path | None]:
    """Everything up to the first step: the trainer, and the checkpoint to resume from (None: a fresh start).

    Data and tower are checked before the language model is loaded, so bad input fails in seconds.
    """
    # Where it will write, first: not after reading the data and loading the model, at the first checkpoint.
    check_output_parent(Path(args.training.output_dir) / STATE_FILE, "--output_dir")
    accelerator = make_accelerator(args)
    output = output_for(args.model.tune_mm_mlp_adapter)
    notes = (accepted_only_notes(args) + _precision_notes(args, accelerator) + _deepspeed_notes(args, accelerator)
             + prepare_wandb(args) + _name_notes(args))
    if accelerator.is_main_process:
        for note in notes:
            print(f"note: {note}")
    samples = read_llava_samples(args.data.data_path, args.data.image_folder, args.model.version)
    tower = check_tower(args)
    resume_from = _prepare_output_dir(args, output, accelerator)
    if resume_from is not None:
        # Before the language model is loaded; the trainer checks again with the number of steps the data makes.
        settings = run_settings(args, accelerator.num_processes, engine=engine_settings(accelerator))
        refuse_changed_settings(resume_from, settings, args.training.resume_lower_lr)
    trained = build_training_model(args, tower, frozen_dtype(accelerator))
    dataset = LlavaDataset(samples, trained.tokenizer, trained.image_processor, trained.layout,
                           args.training.model_max_length)
    trainer = LlavaTrainer(accelerator, trained, dataset, LlavaCollator(trained.tokenizer.pad_token_id), args, output)
    return trainer, resume_from


def run_training(args: LlavaArguments) -> TrainResult:
    """Train as the flags say and write the output into --output_dir; print where it is (main process)."""
    trainer, resume_from = prepare_run(args)
    main = trainer.accelerator.is_main_process
    if main:
        print(f"{len(trainer.loader.dataset)} samples, {trainer.total_steps} optimizer steps of "
              f"{trainer.sampler.global_batch_size} samples x {args.training.gradient_accumulation_steps} "
              f"accumulation, {trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device.type}, "
              f"{sum(whole_numel(p) for p in trainer.trainable):,} trainable parameters, "
              f"engine {trainer.engine}")
    result = trainer.train(resume_from)
    if main:
        print("\n".join(summary_lines(args, trainer.output, result)))
    return result


def _prepare_output_dir(args: LlavaArguments, output: ProjectorOutput | FullOutput, accelerator) -> Path | None:
    """Refuse to retrain over a finished run, clear it with --overwrite_output_dir, or find the checkpoint to resume."""
    t = args.training
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a directory; choose another --output_dir")
    if t.overwrite_output_dir:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path in [*out.glob(f"{CHECKPOINT_PREFIX}*"), *(out / name for name in STALE_ON_OVERWRITE)]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        return None
    if output.is_complete(out):
        raise UserError(f"--output_dir {out} already holds a finished run; pass --overwrite_output_dir True to "
                        "train it again, or choose another --output_dir")
    if t.resume_from_checkpoint:
        path = Path(t.resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE}); "
                            f"pass a {CHECKPOINT_PREFIX}N directory")
        return path
    return latest_checkpoint(out)


def launched() -> bool:
    """Whether a launcher (deepspeed, torchrun, accelerate launch) started this process: they all set WORLD_SIZE."""
    return "WORLD_SIZE" in os.environ


def deepspeed_config(args: LlavaArguments) -> str | None:
    """The DeepSpeed config this run trains under: --deepspeed CONFIG in a launched run, checked before anything
    is loaded (an HF Trainer fails on a missing file or package only once the model is built)."""
    config = args.training.deepspeed
    if config is None or not launched():
        return None
    if not Path(config).is_file():
        raise UserError(f"--deepspeed {config}: no such file; LLaVA's configs are scripts/zero2.json and "
                        "scripts/zero3.json in this checkout")
    _zero_stage(Path(config))  # a readable DeepSpeed JSON
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed {config}: DeepSpeed is not installed here; pip install "
                        "'clip-moe-toolkit[deepspeed]', or drop --deepspeed to train with DDP")
    return config


def _deepspeed_notes(args: LlavaArguments, accelerator) -> list[str]:
    """--deepspeed in one process started without a launcher (plain python) is ignored, said in one line: LLaVA's
    scripts name it in every flag list, and the embedded CPU runs start that way."""
    from accelerate.utils import DistributedType

    config = args.training.deepspeed
    if config is None or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return []
    missing = "" if Path(config).is_file() else " (the file does not exist either)"
    note = (f"--deepspeed {config} is ignored: one process started without a launcher trains alone; start it with "
            f"`deepspeed`, `torchrun` or `accelerate launch` to train under DeepSpeed{missing}")
    return [note]


def _zero_stage(config: Path) -> int | None:
    """The ZeRO stage a DeepSpeed JSON asks for (None: no such file, or no stage in it)."""
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--deepspeed {config} is not a DeepSpeed JSON config ({err}); pass one such as "
                        "scripts/zero2.json") from None


def _name_notes(args: LlavaArguments) -> list[str]:
    """LLaVA's load_pretrained_model decides what to build from substrings of the model name."""
    name = Path(args.training.output_dir).resolve().name.lower()
    notes = []
    if "llava" not in name:
        notes.append(f"the output directory name {name!r} lacks 'llava': load_pretrained_model (and lmms-eval) "
                     "treat it as a plain language model unless the model_name passed contains 'llava'")
    if "lora" in name or "mpt" in name:
        notes.append(f"the output directory name {name!r} contains 'lora' or 'mpt', which sends load_pretrained_model "
                     "down another branch; pass another model_name when loading, or rename the directory")
    return notes


def summary_lines(args: LlavaArguments, output: ProjectorOutput | FullOutput, result: TrainResult) -> list[str]:
    """Where the output is and how LLaVA code loads it."""
    out = Path(args.training.output_dir).resolve()
    lines = [(f"trained {result.steps} steps on {result.samples_seen} samples: loss {result.start_loss:.4f} -> "
              f"{result.end_loss:.4f} (mean of the first / last {result.loss_window} steps)")]
    if result.truncated or result.empty_batches:
        lines.append(f"{result.truncated} samples were cut to --model_max_length {args.training.model_max_length}; "
                     f"{result.empty_batches} micro-batches had no answer tokens left and taught nothing")
    if isinstance(output, ProjectorOutput):
        llm = _local(args.model.model_name_or_path)
        load = (f"  in LLaVA: load_pretrained_model({json.dumps(str(out))}, model_base={json.dumps(llm)}, "
                f"model_name={json.dumps(out.name)})")
        lines += [f"output: {out} (config.json + {PROJECTOR_FILE})",
                  f"  stage 2:  --pretrain_mm_mlp_adapter {out / PROJECTOR_FILE}", load]
    else:
        tower = f", the trained vision tower in {TOWER_DIR}/" if trains_tower(args) else ""
        lines += [f"output: {out} (a LLaVA checkpoint: config.json, safetensors, tokenizer{tower})",
                  f"  in LLaVA: load_pretrained_model({json.dumps(str(out))}, None, model_name={json.dumps(out.name)})"]
    lines.append(f"  metrics:  {out / 'metrics.jsonl'}; TensorBoard: {args.training.logging_dir or out / 'logs'}")
    return lines


def _local(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name
