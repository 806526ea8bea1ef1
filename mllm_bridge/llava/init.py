"""`python -m mllm_bridge init-llava`: a LLaVA checkpoint (not yet trained) from a language model and a vision tower.

What stage-1 training starts from (LLaVA's own `initialize_vision_modules`: tower, config keys, a new projector),
saved as a full checkpoint, so that evaluation, checking and loading can run end to end before any training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder.utils.errors import UserError
from encoder.utils.files import atomic_output_dir, check_output_dir

from .loading import quiet_transformers
from .model import build_llava_model
from .tower_info import read_tower, tower_kinds

TOWER_KEY = ".vision_tower."  # the tower loads from mm_vision_tower; copies of its weights would be ignored


def init_llava(out: str | Path, tower: str | Path, llm: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a LLaVA-1.5-style checkpoint (mlp2x_gelu projector, select layer -2) of `llm` around `tower`,
    atomically, with the LLM's tokenizer."""
    from transformers import AutoTokenizer

    check_output_dir(out, overwrite)
    if not Path(tower).is_dir():
        raise UserError(f"--tower {tower} is not a directory; pass a {tower_kinds()} directory")
    read_tower(tower)  # a clear error for anything that is no tower of a known family
    if not (Path(llm) / "config.json").is_file():
        raise UserError(f"--llm {llm} has no config.json; pass a Llama language model directory")
    tokenizer = AutoTokenizer.from_pretrained(llm, use_fast=False)
    torch.manual_seed(seed)  # the new projector's initialisation
    with quiet_transformers():
        model = build_llava_model(llm, Path(tower).resolve())
    state = {k: v for k, v in model.state_dict().items() if TOWER_KEY not in k}
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def run_init_llava(args) -> int:
    """`python -m mllm_bridge init-llava`."""
    out = init_llava(args.out, args.tower, args.llm, args.seed, args.overwrite)
    print(f"LLaVA checkpoint written to {out} (tower {args.tower}; untrained projector)")
    return 0
