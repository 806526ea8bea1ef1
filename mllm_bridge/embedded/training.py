"""The run a bare `bash scripts/pretrain_projector.sh` / `finetune.sh` makes: everything built here, on the CPU.

- data: the digit-grid set (`python -m upcycle make-digit-grids`): captions for stage 1, one-word
  questions and answers for stage 2;
- vision tower: a small CLIP (`python -m upcycle init-base`) sparse-upcycled into a CLIP-MoE
  (`python -m upcycle sparse`, vision tower, top-2 of 4 experts), exported vision-only as LLaVA uses it;
- language model: a tiny randomly initialised Llama with a tokenizer trained offline on the data's texts.

The upcycle commands run as subprocesses, as a user would run them: `mllm_bridge` does not import `upcycle`'s
model-making code. Each part is written atomically and reused on later runs.

`python -m mllm_bridge.train` runs it when none of its data flags is given (`embedded_namespace`); the command line
hands in its parser builder, so this module never imports the command line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from encoder.utils.constants import IMAGE_TOKEN
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_dir

from ..train.conversation import V1_END, V1_ROLES, V1_SYSTEM
from ..train.stages import FINETUNE, PRETRAIN, Stage
from .tiny_lm import save_tiny_llm

DEFAULT_DIR = Path("runs/llava-default")
PRETRAIN_OUTPUT = "llava-clip-moe-pretrain"
FINETUNE_OUTPUT = "llava-clip-moe-finetune"

# Training values of the embedded run (flags the user passes still win): sized for a few minutes on 2 cores.
# Only what the tiny data and models need differs from LLaVA-1.5's scripts; everything else (gradient
# checkpointing, precision, data workers: 0 on the CPU, 4 on GPUs) keeps LLaVA's / the loop's defaults.
PRETRAIN_FLAGS = dict(per_device_train_batch_size=16, learning_rate=1e-3, save_steps=50)
FINETUNE_FLAGS = dict(per_device_train_batch_size=16, learning_rate=5e-4, save_steps=50)


@dataclass(frozen=True)
class EmbeddedAssets:
    data: Path  # digit grids: train.json (captions), train_qa.json (questions), images/
    tower: Path  # CLIP-MoE vision tower directory
    llm: Path  # tiny Llama with tokenizer
    dense_base: Path  # the dense CLIP the tower was sparse-upcycled from (same function, no experts)


def ensure_assets(root: str | Path = DEFAULT_DIR, num_train: int = 2000, num_test: int = 200,
                  image_size: int = 32) -> EmbeddedAssets:
    """Build whatever part of the embedded default is missing under `root`; return where the parts are."""
    root = Path(root)
    assets = EmbeddedAssets(root / "digit-grids", root / "clip-moe-vision", root / "llm", root / "clip-base")
    base, full = assets.dense_base, root / "clip-moe"
    if not (assets.data / "train_qa.json").is_file():
        _upcycle("make-digit-grids", "--out", assets.data, "--num-train", num_train, "--num-val", 0,
                 "--num-test", num_test, "--image-size", image_size, "--grid", 2, "--overwrite")
    if not (assets.tower / "config.json").is_file():
        if not (full / "config.json").is_file():
            if not (base / "config.json").is_file():
                _upcycle("init-base", "--captions", assets.data / "train.json", "--out", base, "--width", 64,
                         "--layers", 4, "--heads", 4, "--image-size", image_size, "--patch-size", 8, "--overwrite")
            _upcycle("sparse", "--base", base, "--out", full, "--num-experts", 4, "--top-k", 2,
                     "--moe-layers", "all", "--towers", "vision", "--overwrite")
        save_vision_tower(full, assets.tower)
    if not (assets.llm / "config.json").is_file():
        save_tiny_llm(assets.llm, training_texts(assets.data))
    return assets


def save_vision_tower(clip_moe: Path, out: Path) -> None:
    """The vision half of a CLIP-MoE directory: what LLaVA loads, without the text tower it would skip."""
    from transformers import CLIPImageProcessor

    from encoder import CLIPMoEModel, save_clip_moe

    model = CLIPMoEModel.from_pretrained(clip_moe)
    card = {"base": str(clip_moe), "recipe": "vision tower of the embedded default's sparse-upcycled CLIP-MoE"}
    save_clip_moe(model.vision_model, out, CLIPImageProcessor.from_pretrained(clip_moe), card=card, overwrite=True)


def training_texts(data: Path) -> list[str]:
    """Every text the two stages feed the LLM, so the tokenizer covers them all."""
    texts = [V1_SYSTEM, *V1_ROLES.values(), V1_END]
    for name in ("train.json", "train_qa.json"):
        for record in json.loads((data / name).read_text()):
            texts += [turn["value"].replace(IMAGE_TOKEN, "") for turn in record["conversations"]]
    return texts


def _upcycle(*args) -> None:
    command = [sys.executable, "-m", "upcycle", *map(str, args)]
    print(f"[embedded default] python {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"building the embedded default failed at `python -m upcycle {args[0]}`: {last}")


def pretrain_flags(assets: EmbeddedAssets, root: Path) -> dict:
    """Flag values of the embedded stage 1 (explicit flags override them)."""
    return dict(PRETRAIN_FLAGS, model_name_or_path=str(assets.llm), vision_tower=str(assets.tower),
                data_path=str(assets.data / "train.json"), image_folder=str(assets.data),
                output_dir=str(root / PRETRAIN_OUTPUT))


def finetune_flags(assets: EmbeddedAssets, root: Path) -> dict:
    """Flag values of the embedded stage 2, starting from the embedded stage 1's projector."""
    return dict(FINETUNE_FLAGS, model_name_or_path=str(assets.llm), vision_tower=str(assets.tower),
                data_path=str(assets.data / "train_qa.json"), image_folder=str(assets.data),
                pretrain_mm_mlp_adapter=str(root / PRETRAIN_OUTPUT / "mm_projector.bin"),
                output_dir=str(root / FINETUNE_OUTPUT))


# Builds the training parser with flag defaults replaced per stage (stage name -> flag values), optionally for argv.
ParserBuilder = Callable[..., argparse.ArgumentParser]


def embedded_namespace(stage: Stage, namespace: argparse.Namespace, argv: list[str],
                       build_parser: ParserBuilder) -> argparse.Namespace:
    """Build the embedded default's parts (main process first), run its stage 1 when stage 2 needs it, and
    re-parse the command line with the embedded values as defaults, so explicit flags still win.

    build_parser: the training command line's `build_parser(stage_defaults, argv=...)`.
    """
    from encoder.training import process_state

    from ..train.arguments import split_arguments
    from ..train.outputs import ProjectorOutput
    from ..train.run import run_training

    root = Path(namespace.embedded_dir)
    with process_state().main_process_first():
        assets = ensure_assets(root)
    flags = {PRETRAIN.name: pretrain_flags(assets, root), FINETUNE.name: finetune_flags(assets, root)}
    if stage is FINETUNE and not ProjectorOutput().is_complete(root / PRETRAIN_OUTPUT):
        print("[embedded default] stage 1 output missing: running `pretrain` first", flush=True)
        stage1 = build_parser(flags).parse_args([PRETRAIN.name, "--embedded_dir", str(root)])
        run_training(split_arguments(stage1))
    return build_parser(flags, argv).parse_args(argv)


def run_make_tiny_llm(args) -> int:
    """`python -m mllm_bridge make-tiny-llm`: the language model of the embedded CPU runs, from a digit-grid folder."""
    data = Path(args.data)
    missing = [n for n in ("train.json", "train_qa.json") if not (data / n).is_file()]
    if missing:
        raise UserError(f"{data} lacks {', '.join(missing)}; give a digit-grid directory "
                        "(python -m upcycle make-digit-grids)")
    if Path(args.out).exists():
        raise UserError(f"{args.out} exists; remove it or choose another --out")
    check_output_dir(args.out, overwrite=False)  # a folder that is a file or not writable: before any work
    save_tiny_llm(Path(args.out), training_texts(data), hidden_size=args.hidden_size, seed=args.seed)
    print(f"tiny Llama written to {args.out}")
    return 0
