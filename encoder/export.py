"""Writing a CLIP-MoE directory: config, safetensors, image processor, tokenizer, model card — atomically.

The directory is assembled in a temporary sibling and renamed into place only when complete, so an
interrupted or failed export never leaves a half-written model where a user (or LLaVA) would load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers import CLIPImageProcessor, PreTrainedModel

from .errors import UserError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out`; move it to `out` only if the block succeeds."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    make_readable(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_owner()}-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner() -> str:
    """host-pid: who writes a temporary sibling, so a later run can tell an abandoned one from a live one."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove the `.NAME.tmp-HOST-PID-*` / `.NAME.old-HOST-PID-*` siblings that a killed writer on this host left
    (for a real model, gigabytes); those of live processes and of other hosts are left alone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)(?:-.*)?$")
    host = socket.gethostname().replace("-", "_")
    removed = []
    for sibling in out.parent.glob(f".{out.name}.*"):
        match = pattern.match(sibling.name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(root: Path) -> None:
    """mkdtemp makes 0700 folders and save_pretrained 0600 weights; give the export the usual umask modes
    so another user or a serving process can load it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_clip_moe(
    model: PreTrainedModel,
    out: str | Path,
    image_processor: CLIPImageProcessor | None = None,
    tokenizer=None,
    card: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` (safetensors + config), its image processor and tokenizer, and a model card, atomically."""
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_model_extras(tmp, model, image_processor, tokenizer, card)
    return Path(out)


def write_model_extras(
    directory: Path,
    model: PreTrainedModel,
    image_processor: CLIPImageProcessor | None = None,
    tokenizer=None,
    card: dict | None = None,
) -> None:
    """Everything of a CLIP-MoE directory but config and weights: image processor, tokenizer, model card and
    recipe. Shared by `save_clip_moe` and the streaming writers (which write the weights themselves); `model`
    may have meta-device parameters, it is only counted."""
    if image_processor is not None:
        image_processor.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(model_card(model, card or {}))
    (directory / "clip_moe_recipe.json").write_text(json.dumps(card or {}, indent=2, default=str) + "\n")


def parameter_summary(model: PreTrainedModel) -> dict:
    """Total parameters, parameters active per token (top-k of E experts), and MoE layers per tower."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    towers = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "up_proj"):
            per_expert = sum(p[0].numel() for p in experts.parameters())
            inactive += per_expert * (module.num_experts - module.top_k)
    for tower in ("vision", "text"):
        cfg = _tower_config(model, tower)
        if cfg is not None:
            towers[tower] = {
                "layers": cfg.num_hidden_layers,
                "moe_layers": list(getattr(cfg, "moe_layers", [])),
                "num_experts": getattr(cfg, "num_experts", 1) if getattr(cfg, "moe_layers", None) else 1,
                "top_k": getattr(cfg, "top_k", 1) if getattr(cfg, "moe_layers", None) else 1,
            }
    return {"total_params": total, "active_params": total - inactive, "towers": towers}


def summary_lines(model: PreTrainedModel) -> list[str]:
    """Human-readable parameter counts and MoE layout, one line each."""
    s = parameter_summary(model)
    lines = [f"  parameters: {s['total_params']:,} total, {s['active_params']:,} active per token"]
    for tower, t in s["towers"].items():
        lines.append(f"  {tower:6s} tower: MoE layers {t['moe_layers'] or 'none'} of {t['layers']}, "
                     f"top-{t['top_k']} of {t['num_experts']} experts")
    return lines


def _tower_config(model, tower: str):
    cfg = getattr(model, "config", None)  # a bare tower module (e.g. CLIPModel.vision_model) has none
    if cfg is None:
        return None
    if hasattr(cfg, f"{tower}_config"):
        return getattr(cfg, f"{tower}_config")
    if getattr(cfg, "base_config_key", None) == f"{tower}_config":
        return cfg
    return None


def model_card(model: PreTrainedModel, card: dict) -> str:
    """A short README.md: what the model is, how it was made, how to load it."""
    summary = parameter_summary(model)
    lines = [
        f"# {card.get('name', 'CLIP-MoE')}",
        "",
        "A sparse Mixture-of-Experts CLIP made with clip-moe-toolkit.",
        "",
        f"- base model: `{card.get('base', 'unknown')}`",
        f"- recipe: {card.get('recipe', 'unknown')}",
        f"- data: {card.get('data', 'none (no training)')}",
        f"- parameters: {summary['total_params']:,} total, {summary['active_params']:,} active per token",
    ]
    for tower, t in summary["towers"].items():
        layers = t["moe_layers"] or "none"
        lines.append(f"- {tower} tower: {t['layers']} layers, MoE layers {layers}, top-{t['top_k']} of {t['num_experts']} experts")
    for key, value in card.get("metrics", {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import encoder  # registers CLIP-MoE with transformers' Auto classes",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained('PATH_TO_THIS_DIRECTORY')",
        "```",
        "",
        "In LLaVA: set `mm_vision_tower` (or `--vision_tower`) to this directory.",
        "",
    ]
    if card.get("details"):
        lines += ["## Details", "", "```json", json.dumps(card["details"], indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `path` through `write(tmp)` on a sibling temporary file renamed into place, so a reader never
    sees a half-written result and a failure leaves any earlier file intact."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{_owner()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
