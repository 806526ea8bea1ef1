"""One LLaVA training run from parsed flags: process group, output directory, data, model, loop, summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from encoder.errors import UserError
from encoder.training import make_accelerator as joined_accelerator
from encoder.training import on_cpu

from .arguments import LlavaArguments, accepted_only_notes
from .data import LlavaCollator, LlavaDataset, read_llava_samples
from .loop import CHECKPOINT_PREFIX, STATE_FILE, LlavaTrainer, TrainResult, latest_checkpoint
from .model_setup import build_training_model, check_tower
from .outputs import FullOutput, ProjectorOutput, output_for
from .projector import PROJECTOR_FILE

# Removed by --overwrite_output_dir besides the checkpoints: the old run's logs, and the config.json that marks
# its output as finished (the other output files are replaced when the new run publishes its own).
STALE_ON_OVERWRITE = ("metrics.jsonl", "logs", "config.json")


def make_accelerator(args: LlavaArguments):
    """An Accelerator in the launch's process group (gloo on CPUs), with the run's precision and accumulation."""
    t = args.training
    cuda = torch.cuda.is_available() and not on_cpu()
    if t.fp16 and not cuda:
        raise UserError("--fp16 needs a GPU; drop it (or use --bf16) on the CPU")
    bf16 = t.bf16 if t.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    mixed = "fp16" if t.fp16 else "bf16" if bf16 else "no"
    if t.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return joined_accelerator(mixed, gradient_accumulation_steps=t.gradient_accumulation_steps)


def frozen_dtype(accelerator) -> torch.dtype:
    """The dtype of modules that never train: the autocast dtype (it halves their memory), else float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def prepare_run(args: LlavaArguments) -> tuple[LlavaTrainer, Path | None]:
    """Everything up to the first step: the trainer, and the checkpoint to resume from (None: a fresh start).

    Data and tower are checked before the language model is loaded, so bad input fails in seconds.
    """
    accelerator = make_accelerator(args)
    output = output_for(args.model.tune_mm_mlp_adapter)
    if accelerator.is_main_process:
        for note in accepted_only_notes(args) + _deepspeed_notes(args, accelerator) + _name_notes(args):
            print(f"note: {note}")
    samples = read_llava_samples(args.data.data_path, args.data.image_folder, args.model.version)
    tower = check_tower(args)
    resume_from = _prepare_output_dir(args, output, accelerator)
    trained = build_training_model(args, tower, frozen_dtype(accelerator))
    dataset = LlavaDataset(samples, trained.tokenizer, trained.image_processor, trained.image_tokens,
                           args.training.model_max_length, args.data.image_aspect_ratio)
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
              f"{sum(p.numel() for p in trainer.trainable):,} trainable parameters")
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


def _deepspeed_notes(args: LlavaArguments, accelerator) -> list[str]:
    from accelerate.utils import DistributedType

    config = args.training.deepspeed
    if config is None:
        return []
    if not Path(config).is_file():
        raise UserError(f"--deepspeed {config} does not exist; pass a DeepSpeed JSON such as scripts/zero2.json")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return []
    how = (f"DDP over {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "one process")
    note = (f"--deepspeed {config} is ignored: DeepSpeed runs only under `accelerate launch --use_deepspeed "
            f"--deepspeed_config_file {config}` with deepspeed installed; this run uses {how} on "
            f"{accelerator.device.type}")
    return [note]


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
        lines += [f"output: {out} (a LLaVA checkpoint: config.json, safetensors, tokenizer)",
                  f"  in LLaVA: load_pretrained_model({json.dumps(str(out))}, None, model_name={json.dumps(out.name)})"]
    lines.append(f"  metrics:  {out / 'metrics.jsonl'}; TensorBoard: {args.training.logging_dir or out / 'logs'}")
    return lines


def _local(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name
