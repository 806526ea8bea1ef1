"""The settings of a contrastive training run (`TrainConfig`) and the values each accepts; the data
(`TrainingData`) and work-directory flags (`TrainOutput`) that `upcycle train` and `upcycle dmu` share.

Every field is an `option` (encoder.utils.options): its flag, help, default and the values it accepts, so
`upcycle train`, `upcycle dmu` (DMUConfig reuses these fields) and the Python API refuse the same nonsense
with the same one line, before any model is loaded or anything is written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from encoder.training import lower_lr
from encoder.utils.options import check_options, option, switch

from .params import TRAINABLE_CHOICES

# TrainConfig fields that change neither the weights nor the schedule, so a resume may change them
# (resume_lower_lr lets a resume change --lr, checked on its own by the trainer, and says so in the record).
NOT_SHAPING = ("desc", "checkpoint_every", "num_workers", lower_lr.FIELD)
RESUME_LOWER_LR = "--resume-lower-lr"
PRECISIONS = ("auto", "fp32", "bf16")
# family: the model family's own loss (CLIP: InfoNCE; SigLIP, SigLIP2: the pairwise sigmoid loss with logit_bias);
# clip / sigmoid name one, and the trainer refuses the one a model cannot train with.
LOSSES = ("family", "clip", "sigmoid")
# Settings added after checkpoints were written, with the value those runs had: a resume of such a checkpoint is
# not refused for a setting its record could not name.
ADDED_SETTINGS = {"loss": "family"}


def parse_logit_scale(text: str) -> float | None:
    """'learnable' -> None (the model's own, trained with --trainable all); a number -> fixed multiplier.

    Which numbers make sense is the config's to say (its Limits), for the command line and the API alike."""
    if text == "learnable":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'learnable' or a number such as 100") from None


def parse_max_grad_norm(text: str) -> float | None:
    """'none' -> None (no clipping); a number -> the clipping norm (checked by TrainConfig)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number such as 1.0, or 'none' for no clipping") from None


@dataclass(frozen=True)
class TrainConfig:
    trainable: str = option("--trainable", "parameters to train: all, ffn (MLPs / experts) or router", "all",
                            kind=str, choices=TRAINABLE_CHOICES)
    epochs: float = option("--epochs", "passes over the data", 1.0, kind=float, low=0, low_open=True)
    # optimizer steps; overrides epochs when set
    max_steps: int | None = option("--max-steps", "stop after this many optimizer steps (overrides --epochs)",
                                   None, kind=int, low=1, optional=True, hint="leave it out to train for --epochs")
    # global batch: pairs per optimizer micro-step over all processes
    batch_size: int = option("--batch-size", "global batch over all processes; its pairs are each other's "
                             "negatives", 64, kind=int, low=1)
    grad_accum: int = option("--grad-accum", "micro-batches per optimizer step", 1, kind=int, low=1)
    lr: float = option("--lr", "peak learning rate", 1e-5, kind=float, low=0, low_open=True)
    weight_decay: float = option("--weight-decay", "AdamW weight decay", 0.2, kind=float, low=0)
    warmup_ratio: float = option("--warmup-ratio", "linear warm-up share of the steps", 0.03, kind=float, low=0,
                                 high=1)
    loss: str = option("--loss", "contrastive loss: family = the model family's own (CLIP: symmetric InfoNCE; "
                       "SigLIP / SigLIP2: pairwise sigmoid with the learned logit_bias), clip or sigmoid", "family",
                       kind=str, choices=LOSSES)
    label_smoothing: float = option("--label-smoothing", "InfoNCE label smoothing (the CLIP loss only)", 0.0,
                                    kind=float, low=0, high=1,
                                    high_open=True)
    # a fixed multiplier (DMU: 100); None = the model's learnable one
    logit_scale: float | None = option("--logit-scale", "'learnable' (the model's own) or a fixed multiplier such "
                                       "as 100", None, parse=parse_logit_scale, default_text="learnable",
                                       kind=float, low=0, low_open=True, optional=True,
                                       hint="pass 'learnable' for the model's own")
    # None: the CLIP-MoE config's (aux_loss_coef, router_z_loss_coef), the one source of their defaults; the
    # trainer reads them from the model it trains (0 for a dense model, which has no router)
    aux_loss_coef: float | None = option("--aux-loss-coef", "load-balance weight", None, kind=float, low=0,
                                         optional=True, default_text="the CLIP-MoE config's")
    z_loss_coef: float | None = option("--z-loss-coef", "router z-loss weight", None, kind=float, low=0,
                                       optional=True, default_text="the CLIP-MoE config's")
    max_grad_norm: float | None = option("--max-grad-norm", "gradient clipping norm, or 'none' for no clipping",
                                         1.0, parse=parse_max_grad_norm, kind=float, low=0, low_open=True,
                                         optional=True, hint="use 'none' to train without clipping")
    checkpoint_every: int = option("--checkpoint-every", "optimizer steps between checkpoints", 500, kind=int,
                                   low=1)
    # None: 0 on CPU, min(8, cores) on GPU
    num_workers: int | None = option("--num-workers", "DataLoader workers", None, kind=int, low=0, optional=True,
                                     default_text="0 on CPU, up to 8 on GPU")
    precision: str = option("--precision", "auto = bf16 autocast on GPUs that support it, else fp32", "auto",
                            kind=str, choices=PRECISIONS)
    seed: int = option("--seed", "seed for batch order and routers", 0, kind=int, low=0)
    resume_lower_lr: bool = switch(RESUME_LOWER_LR, lower_lr.HELP)
    desc: str = "train"  # names the run in progress bars and logs

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class TrainingData:
    """The image-caption pairs a training command reads (`upcycle train`, `upcycle dmu`)."""

    train_data: str = option("--train-data", "image-caption pairs: LLaVA/ShareGPT4V JSON, JSONL, CSV or TSV with "
                             "image and caption columns, or WebDataset tar shards (data-{000..099}.tar)")
    image_root: str | None = option("--image-root", "folder the image paths are relative to", None,
                                    default_text="the data file's folder")
    skip_missing: bool = switch("--skip-missing", "drop pairs whose image is missing or empty (0 bytes), counted")


@dataclass(frozen=True)
class TrainOutput:
    """Where a training command keeps its work and whether it may continue or replace it (`train`, `dmu`)."""

    work_dir: str | None = option("--work-dir", "checkpoints, logs (metrics.jsonl, TensorBoard) and state", None,
                                  default_text="next to --out")
    resume: bool = switch("--resume", "continue the run found in the work directory")
    overwrite: bool = switch("--overwrite", "replace --out if it exists")
