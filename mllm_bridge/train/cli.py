"""Command line of LLaVA-1.5 training around a CLIP(-MoE) or SigLIP(-MoE) tower: `pretrain` (stage 1), `finetune` (stage 2).

    python -m mllm_bridge.train pretrain --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower clip-moe-l14-336 \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images --output_dir checkpoints/llava-clip-moe-pretrain
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from encoder.utils.cli import UserErrorParser, run_cli

# The command line wires the CPU demo in as its default (the fence allows this to command lines only).
from ..embedded.training import DEFAULT_DIR, embedded_namespace
from .arguments import add_llava_arguments, split_arguments
from .stages import FINETUNE, PRETRAIN, STAGES, Stage

DATA_FLAGS = ("model_name_or_path", "vision_tower", "data_path")

EPILOG = {
    PRETRAIN.name: "With none of --model_name_or_path, --vision_tower, --data_path it runs the embedded default: "
    "digit-grid captions, a small sparse-upcycled CLIP-MoE and a tiny Llama, built under --embedded_dir, a few "
    "minutes on a CPU. Several GPUs: accelerate launch --num_processes 8 -m mllm_bridge.train pretrain ... "
    "Interrupted? Run the same command again: it resumes from the newest checkpoint-N in --output_dir.",
    FINETUNE.name: "With none of --model_name_or_path, --vision_tower, --data_path it runs the embedded default: "
    "digit-grid questions with one-word answers, from the embedded stage 1's projector (stage 1 runs first if "
    "its output is missing). Interrupted? Run the same command again to resume.",
}


def build_parser(stage_defaults: dict[str, dict] | None = None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; `stage_defaults` (stage name -> flag values) replaces defaults, e.g. for the embedded run."""
    parser = UserErrorParser(prog="python -m mllm_bridge.train", description=__doc__.splitlines()[0],
                             allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES.values():
        p = commands.add_parser(stage.name, help=stage.title, description=stage.description, epilog=EPILOG[stage.name],
                                usage="%(prog)s [--flag value ...]", allow_abbrev=False)
        defaults = {**stage.defaults, **(stage_defaults or {}).get(stage.name, {})}
        add_llava_arguments(p, defaults)
        p.add_argument("--embedded_dir", default=str(DEFAULT_DIR),
                       help="where the embedded default keeps its data, models and outputs (default: %(default)s)")
        p.set_defaults(run=lambda ns, stage=stage: _run(stage, ns, list(argv)))
    return parser


def _is_embedded(namespace: argparse.Namespace) -> bool:
    return all(getattr(namespace, name) is None for name in DATA_FLAGS)


def _run(stage: Stage, namespace: argparse.Namespace, argv: list[str]) -> int:
    from .run import run_training

    if _is_embedded(namespace):
        namespace = embedded_namespace(stage, namespace, argv, build_parser)
    run_training(split_arguments(namespace))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = _local_rank_after_command(list(sys.argv[1:] if argv is None else argv))
    return run_cli(build_parser(argv=argv), argv)


def _local_rank_after_command(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` right after the module (`deepspeed --module
    mllm_bridge.train finetune ...` runs `python -m mllm_bridge.train --local_rank=N finetune ...`): it moves behind
    the command, where `--local_rank` is a flag as in LLaVA's train.py."""
    ranks = [a for a in argv[:1] if a.startswith(("--local_rank=", "--local-rank="))]
    if not ranks or len(argv) < 2:
        return argv
    return [argv[1], ranks[0].replace("--local-rank", "--local_rank"), *argv[2:]]
