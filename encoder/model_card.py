"""What a MoE directory (CLIP-MoE, SigLIP-MoE, ...) says about itself: parameter counts (total, active per token),
its MoE layout, README.md."""

from __future__ import annotations

import json

from transformers import PreTrainedModel

from .family import find_family


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
            if getattr(cfg, "moe_head", False):  # only said where it is set: a CLIP's summary is what it always was
                towers[tower].update(moe_head=True, num_experts=cfg.num_experts, top_k=cfg.top_k)
    return {"total_params": total, "active_params": total - inactive, "towers": towers}


def summary_lines(model: PreTrainedModel) -> list[str]:
    """Human-readable parameter counts and MoE layout, one line each."""
    s = parameter_summary(model)
    lines = [f"  parameters: {s['total_params']:,} total, {s['active_params']:,} active per token"]
    for tower, t in s["towers"].items():
        lines.append(f"  {tower:6s} tower: MoE layers {t['moe_layers'] or 'none'} of {t['layers']}"
                     f"{_head(t)}, top-{t['top_k']} of {t['num_experts']} experts")
    return lines


def _head(tower: dict) -> str:
    return " and the pooling head's MLP" if tower.get("moe_head") else ""


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
    match = find_family(getattr(model, "config", None) or {})
    dense, label = (match.family.label(False), match.family.label(True)) if match else ("CLIP", "CLIP-MoE")
    lines = [
        f"# {card.get('name', label)}",
        "",
        f"A sparse Mixture-of-Experts {dense} made with clip-moe-toolkit.",
        "",
        f"- base model: `{card.get('base', 'unknown')}`",
        f"- recipe: {card.get('recipe', 'unknown')}",
        f"- data: {card.get('data', 'none (no training)')}",
        f"- parameters: {summary['total_params']:,} total, {summary['active_params']:,} active per token",
    ]
    for tower, t in summary["towers"].items():
        layers = t["moe_layers"] or "none"
        lines.append(f"- {tower} tower: {t['layers']} layers, MoE layers {layers}{_head(t)}, top-{t['top_k']} of "
                     f"{t['num_experts']} experts")
    for key, value in card.get("metrics", {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"import encoder  # registers {label} with transformers' Auto classes",
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
