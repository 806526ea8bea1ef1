"""Which file of a model directory holds its weights: the one transformers' `from_pretrained` reads, for every reader.

A directory may hold more than one set (a `model.safetensors` beside a shard index left by an earlier save, a
`.bin` beside safetensors). Every reader that does not go through `from_pretrained` (the streaming readers of
`encoder.tensor_stream`, the header checks of `encoder.model_dir`, LLaVA's output reader) asks `weights_entry`,
so `upcycle sparse` upcycles the weights every other command loads. The order is transformers' own
(`modeling_utils._get_resolved_checkpoint_files`, transformers 5): `transformers_weights` in config.json when
set, else `model.safetensors`, then `model.safetensors.index.json`, then `pytorch_model.bin`, then
`pytorch_model.bin.index.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .utils.errors import UserError
from .utils.files import file_sha256

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ORDER = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)
EXPLICIT_KEY = "transformers_weights"  # config.json's pointer at the weights, which from_pretrained honours first


def weights_entry(directory: str | os.PathLike) -> Path | None:
    """The weights file `from_pretrained(directory)` reads (a shard index stands for its shards); None when the
    directory holds none. UserError when config.json points `transformers_weights` at a file transformers would
    refuse (not safetensors, or outside the directory)."""
    directory = Path(directory)
    explicit = _explicit_name(directory)
    if explicit is not None:
        entry = directory / explicit
        inside = os.path.commonpath([os.path.abspath(directory), os.path.abspath(entry)]) == os.path.abspath(directory)
        if not inside or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            raise UserError(f"{directory / 'config.json'}: {EXPLICIT_KEY} {explicit!r} is not a safetensors file "
                            "or shard index inside the model directory; correct it or remove the key")
        return entry
    return next((directory / name for name in ORDER if (directory / name).is_file()), None)


def is_safetensors(entry: Path | None) -> bool:
    """Whether `weights_entry`'s answer is safetensors (a file or a shard index), which the streaming readers read."""
    return entry is not None and entry.name.endswith((".safetensors", ".safetensors.index.json"))


def is_index(entry: Path) -> bool:
    """Whether `entry` is a shard index (a JSON `weight_map` naming the files that hold each tensor)."""
    return entry.name.endswith(".index.json")


def weights_sha256(directory: str | os.PathLike) -> str | None:
    """Hex SHA-256 of the weights `from_pretrained(directory)` reads (None when it holds none), for resume identities:
    the file's own digest, or for a shard index one digest over the index and each shard it names."""
    entry = weights_entry(directory)
    if entry is None or not entry.is_file():
        return None
    if not is_index(entry):
        return file_sha256(entry)
    try:
        shards = sorted(set(json.loads(entry.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return file_sha256(entry)  # not an index a loader could read; its readers report that
    digest = hashlib.sha256(file_sha256(entry).encode())
    for shard in shards:
        path = entry.parent / shard
        digest.update(f"{shard}:{file_sha256(path) if path.is_file() else 'missing'}".encode())
    return digest.hexdigest()


def _explicit_name(directory: Path) -> str | None:
    """config.json's `transformers_weights`; None when unset or when config.json is unreadable (its own readers
    report that)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    value = config.get(EXPLICIT_KEY) if isinstance(config, dict) else None
    return value if isinstance(value, str) else None
