"""What a run writes — in every checkpoint and as its final output — in the layouts LLaVA's code reads.

- projector only (`--tune_mm_mlp_adapter True`, stage 1): `config.json` + `mm_projector.bin`, as LLaVA's
  trainer saves it. `load_pretrained_model(OUTPUT_DIR, model_base=LLM_DIR, model_name)` loads it when
  model_name contains 'llava' and neither 'lora' nor 'mpt' (it then takes the tokenizer and the LLM
  weights from model_base); stage 2 reads the .bin through `--pretrain_mm_mlp_adapter`.
- full (stage 2): `config.json` + safetensors + tokenizer, loadable by `load_pretrained_model(OUTPUT_DIR,
  None, model_name)` and `LlavaLlamaForCausalLM.from_pretrained`. The tower's weights are left out: LLaVA
  builds the tower from `mm_vision_tower` and loads it from there (delayed loading ignores stored copies).
  A tower that trained is saved as a model directory of its own, `vision_tower/`, and `mm_vision_tower` names
  it (an absolute path: after moving the output, point it there again with `python -m mllm_bridge swap-tower`).

`config.json` is always the last file to appear, so a directory with a config.json is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
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
TOWER_DIR = "vision_tower"  # a trained tower, inside the output and each checkpoint
TRAINED_FROM_FILE = "trained_from.json"  # in TOWER_DIR: the tower it was trained from
FINAL_TMP = "final"  # `publish` assembles the output in OUTPUT_DIR/.final.tmp-HOST-PID-*/


class ProjectorOutput:
    """Stage 1's output: the projector under LLaVA's key names, and the model config."""

    kind = "projector"

    def write(self, model: nn.Module, tokenizer, directory: Path, weights: dict[str, torch.Tensor],
              final: Path | None = None) -> None:
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

    def write(self, model: nn.Module, tokenizer, directory: Path, weights: dict[str, torch.Tensor],
              final: Path | None = None) -> None:
        """`weights`: the model's whole state dict (gathered from the ranks where the engine shards it). `final`:
        where `directory` will end up (it is written elsewhere and moved), for the trained tower's path."""
        state = {k: v for k, v in weights.items() if TOWER_KEY not in k}
        if tower_trains(model):
            _write_tower(model, directory / TOWER_DIR, weights)
            with _tower_at(model, (final or directory).resolve() / TOWER_DIR), _cache_enabled(model):
                model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        else:
            with _cache_enabled(model):
                model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    def read_trained(self, model: nn.Module, directory: Path) -> None:
        weights = _read_weights(directory)
        if tower_trains(model):
            if not (directory / TOWER_DIR).is_dir():
                raise UserError(f"{directory} holds no trained vision tower ({TOWER_DIR}/); it was written by a run "
                                "with the tower frozen; resume with the same flags or use another --output_dir")
            # Read back as LLaVA's builder reads it, then under the LLaVA model's names.
            inner = model.get_vision_tower().vision_tower
            saved = type(inner).from_pretrained(str(directory / TOWER_DIR), dtype=torch.float32).state_dict()
            weights.update({_tower_prefix(model) + k: v for k, v in saved.items()})
        _load_trained(model, weights, directory)

    def is_complete(self, directory: Path) -> bool:
        return (directory / CONFIG_FILE).is_file() and any(directory.glob("model*.safetensors"))


def tower_trains(model: nn.Module) -> bool:
    tower = model.get_vision_tower()
    return not isinstance(tower, list) and any(p.requires_grad for p in tower.parameters())


def _tower_prefix(model: nn.Module) -> str:
    """The prefix of the tower model's weights in the LLaVA model's state dict (model.vision_tower.vision_tower.)."""
    inner = model.get_vision_tower().vision_tower
    return next(name for name, module in model.named_modules() if module is inner) + "."


def _write_tower(model: nn.Module, directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """The trained tower as a model directory of its own kind (a CLIP-MoE vision tower, or a dense CLIP vision
    model) with its image processor, which LLaVA's builder (through the hook for a CLIP-MoE), lmms-eval and
    `python -m mllm_bridge check` load as they load any tower."""
    tower = model.get_vision_tower()
    inner = tower.vision_tower
    # Always from `weights` (gathered from the ranks under ZeRO-3 / FSDP2, where the live module holds a shard).
    prefix = _tower_prefix(model)
    state = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in weights.items() if k.startswith(prefix)}
    if not getattr(inner.config, "moe_layers", None):  # a dense CLIPVisionModel: transformers' own layout
        inner.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tower.image_processor.save_pretrained(directory)
        _write_trained_from(directory, tower)
        return
    # A CLIP-MoE vision export holds the tower model's own keys (its state dict), written as they are: save_pretrained
    # would give a tower loaded from a full CLIP-MoE directory that directory's `vision_model.` keys back, which a
    # vision-only config does not load.
    directory.mkdir()
    inner.config.architectures = [type(inner).__name__]
    inner.config.save_pretrained(directory)
    save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    tower.image_processor.save_pretrained(directory)
    _write_trained_from(directory, tower)


def _write_trained_from(directory: Path, tower) -> None:
    trained_from = {"trained_from": str(tower.vision_tower_name), "trained_in": "LLaVA stage 2 (mllm_bridge.train)"}
    (directory / TRAINED_FROM_FILE).write_text(json.dumps(trained_from, indent=1) + "\n")


class _tower_at:
    """Saved configs name the trained tower in the output as `mm_vision_tower` (LLaVA builds the tower from it, so
    the original must never be loaded in its place) and keep the original as `mm_vision_tower_trained_from`."""

    def __init__(self, model: nn.Module, path: Path):
        self.config, self.path = model.config, str(path)

    def __enter__(self):
        self.before = self.config.mm_vision_tower
        self.config.mm_vision_tower_trained_from = self.before
        self.config.mm_vision_tower = self.path

    def __exit__(self, *exc):
        self.config.mm_vision_tower = self.before
        del self.config.mm_vision_tower_trained_from


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    entry = weights_entry(directory) or directory / SAFETENSORS_FILE  # the file from_pretrained would read
    files = (sorted(set(json.loads(entry.read_text())["weight_map"].values())) if is_index(entry)
             else [entry.name])
    weights = {}
    for name in files:
        weights.update(load_file(str(directory / name)))
    return weights


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
