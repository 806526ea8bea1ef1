"""A LLaVA checkpoint's config.json: the keys that tie it to its vision tower, read and rewritten safely."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from encoder.model_dir import CONFIG_FILE, read_config_json
from encoder.utils.errors import UserError


@dataclass(frozen=True)
class LlavaCheckpointConfig:
    """The tower-related fields of a LLaVA (llava-torch) checkpoint config, with LLaVA's defaults."""

    directory: Path
    values: dict

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def vision_tower(self) -> str | None:
        # LLaVA's builder: getattr(cfg, 'mm_vision_tower', getattr(cfg, 'vision_tower', None))
        if "mm_vision_tower" in self.values:
            return self.values["mm_vision_tower"]
        return self.values.get("vision_tower")

    @property
    def select_layer(self):
        return self.values.get("mm_vision_select_layer")

    @property
    def select_feature(self):
        return self.values.get("mm_vision_select_feature", "patch")

    @property
    def mm_hidden_size(self):
        return self.values.get("mm_hidden_size")

    @property
    def projector_type(self) -> str:
        return self.values.get("mm_projector_type", "linear")

    @property
    def context_length(self) -> int | None:
        """Tokens the LLM takes: the training max length where recorded, else its position embeddings."""
        return self.values.get("tokenizer_model_max_length") or self.values.get("max_position_embeddings")

    @property
    def model_name(self) -> str:
        """The name `load_pretrained_model` is given for this directory (lmms-eval's and LLaVA's rule)."""
        parts = self.directory.resolve().parts
        if parts[-1].startswith("checkpoint-") and len(parts) > 1:
            return f"{parts[-2]}_{parts[-1]}"
        return parts[-1]

    def with_values(self, **updates) -> LlavaCheckpointConfig:
        return LlavaCheckpointConfig(self.directory, {**self.values, **updates})


def read_llava_config(directory: str | Path) -> LlavaCheckpointConfig:
    """Read `directory/config.json` of a multimodal LLaVA checkpoint; UserError when it is not one."""
    directory = Path(directory)
    values = read_config_json(directory, "LLaVA checkpoint directory", "restore it from a backup")
    config = LlavaCheckpointConfig(directory, values)
    if config.vision_tower is None:
        raise UserError(f"{config.config_path} has no mm_vision_tower: not a multimodal LLaVA checkpoint "
                        "(a stage-1 or stage-2 output, or a released LLaVA model)")
    return config


def write_llava_config(old: LlavaCheckpointConfig, new: LlavaCheckpointConfig) -> Path:
    """Replace config.json by `new.values` atomically, after copying the current file to a backup.

    The backup is `config.json.bak`, or `config.json.bak-<timestamp>` when that exists, so no earlier
    backup is ever overwritten. Returns the backup's path.
    """
    path = old.config_path
    backup = _free_backup_path(path)
    shutil.copy2(path, backup)
    text = json.dumps(new.values, indent=2, sort_keys=True) + "\n"  # transformers' own layout
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup


def _free_backup_path(path: Path) -> Path:
    backup = path.with_name(path.name + ".bak")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f"-{n}" if n > 1 else ""))
    return backup
