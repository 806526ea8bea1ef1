"""What a run writes — in every checkpoint and as its final output — in the layouts LLaVA's code reads.

- projector only (`--tune_mm_mlp_adapter True`, stage 1): `config.json` + `mm_projector.bin`, as LLaVA's
  trainer saves it. `load_pretrained_model(OUTPUT_DIR, model_base=LLM_DIR, model_name)` loads it when
  model_name contains 'llava' and neither 'lora' nor 'mpt' (it then takes the tokenizer and the LLM
  weights from model_base); stage 2 reads the .bin through `--pretrain_mm_mlp_adapter`.
- full (stage 2): `config.json` + safetensors + tokenizer, loadable by `load_pretrained_model(OUTPUT_DIR,
  None, model_name)` and `LlavaLlamaForCausalLM.from_pretrained`. The tower's weights are left out: LLaVA
  builds the tower from `mm_vision_tower` and loads it from there (delayed loading ignores stored copies).

`config.json` is always the last file to appear, so a directory with a config.json is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from encoder.utils.errors import UserError
from encoder.utils.files import (
    make_readable,
    owned_temporary_dir,
    remove_stale_siblings,
    write_failure,
)
from encoder.weight_files import SAFETENSORS_FILE, is_index, weights_entry

from .projector import PROJECTOR_FILE, projector_parameter_names

CONFIG_FILE = "config.json"
TOWER_KEY = ".vision_tower."
FINAL_TMP = "final"  # `publish` assembles the output in OUTPUT_DIR/.final.tmp-HOST-PID-*/


class ProjectorOutput:
    """Stage 1's output: the projector under LLaVA's key names, and the model config."""

    kind = "projector"

    def write(self, model: nn.Module, tokenizer, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """`weights`: the model's whole state dict (gathered from the ranks where the engine shards it)."""
        torch.save({name: weights[name].detach().cpu().contiguous() for name in projector_parameter_names(model)},
                   directory / PROJECTOR_FILE)
        _save_config(model, directory)

    def read_trained(self, model: nn.Module, directory: Path) -> None:
        weights = torch.load(directory / PROJECTOR_FILE, map_location="cpu", weights_only=True)
        _load_trained(model, weights, directory)

    def is_complete(self, directory: Path) -> bool:
        return (directory / CONFIG_FILE).is_file() and (directory / PROJECTOR_FILE).is_file()


class FullOutput:
    """Stage 2's output: a LLaVA checkpoint directory (the vision tower stays where mm_vision_tower points)."""

    kind = "full"

    def write(self, model: nn.Module, tokenizer, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """`weights`: the model's whole state dict (gathered from the ranks where the engine shards it)."""
        state = {k: v for k, v in weights.items() if TOWER_KEY not in k}
        with _cache_enabled(model):
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    def read_trained(self, model: nn.Module, directory: Path) -> None:
        entry = weights_entry(directory) or directory / SAFETENSORS_FILE  # the file from_pretrained would read
        files = (sorted(set(json.loads(entry.read_text())["weight_map"].values())) if is_index(entry)
                 else [entry.name])
        weights = {}
        for name in files:
            weights.update(load_file(str(directory / name)))
        _load_trained(model, weights, directory)

    def is_complete(self, directory: Path) -> bool:
        return (directory / CONFIG_FILE).is_file() and any(directory.glob("model*.safetensors"))


def output_for(tune_mm_mlp_adapter: bool) -> ProjectorOutput | FullOutput:
    """LLaVA's rule: projector-only training saves the projector only."""
    return ProjectorOutput() if tune_mm_mlp_adapter else FullOutput()


def _save_config(model: nn.Module, directory: Path) -> None:
    with _cache_enabled(model):
        model.config.save_pretrained(directory)


class _cache_enabled:
    """Saved configs say use_cache=True (LLaVA switches it off for training only)."""

    def __init__(self, model: nn.Module):
        self.config = model.config

    def __enter__(self):
        self.before, self.config.use_cache = self.config.use_cache, True

    def __exit__(self, *exc):
        self.config.use_cache = self.before


def _load_trained(model: nn.Module, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Put a checkpoint's tensors back; every trainable parameter must be among them."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    absent = [name for name in trainable if name not in weights]
    if absent:
        raise UserError(f"{directory} lacks trained weights such as {absent[0]}; it was written by a run with other "
                        "trainable parameters; resume with the same flags or use another --output_dir")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trainable:
            params[name].copy_(weights[name])


def remove_stale_final(out: Path) -> list[Path]:
    """Remove what a final write killed midway left in `out` (a whole model's files): dead writers' only."""
    return remove_stale_siblings(out / FINAL_TMP)


def publish(write: Callable[[Path], None], out: Path) -> None:
    """Write files through `write(tmp)` into a hidden folder inside `out`, then move them into `out`,
    config.json last: `out` also holds checkpoints and logs, so it cannot be swapped as a whole."""
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = owned_temporary_dir(out, FINAL_TMP)
        write(tmp)
        make_readable(tmp)  # mkdtemp and save_pretrained create owner-only modes
        files = sorted(p for p in tmp.iterdir() if p.name != CONFIG_FILE)
        for path in files + [tmp / CONFIG_FILE]:
            if path.is_dir():
                target = out / path.name
                if target.exists():
                    shutil.rmtree(target)
            os.replace(path, out / path.name)
    except BaseException as exc:  # a full or read-only disk: one line naming --output_dir, no traceback
        failure = write_failure(exc, out, tmp, "--output_dir")
        if failure is not None:
            raise failure from exc
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
