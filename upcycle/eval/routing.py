"""How a CLIP-MoE routes real data: expert usage, router entropy and token counts per tower and MoE layer.

Collapsed routing (one expert taking most choices) or routers that never leave uniform are the first
things to rule out after upcycling or router training; the heat map shows both at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from encoder.family import families, is_full_moe
from encoder.routing_stats import RoutingTally
from encoder.utils.errors import UserError

from ..data import Pair
from .embedding import fixed_length_text, inference, pair_loader, text_max_length

TOWERS = ("vision", "text")


def not_moe_error(what: str) -> UserError:
    kinds = " or ".join(family.label(True) for family in families())  # "CLIP-MoE or SigLIP-MoE or ..."
    return UserError(f"not a {kinds}: {what} has no routers, nothing to route; give a MoE directory "
                     "(e.g. one written by `python -m upcycle sparse`)")


def routing_stats(model: PreTrainedModel, pairs: Sequence[Pair], image_processor, tokenizer, batch_size: int = 64,
                  num_workers: int = 0, desc: str = "routing") -> dict:
    """Routing of `pairs` through a `CLIPMoEModel`, per tower with MoE layers and per MoE layer.

    Returns {"towers": {tower: `RoutingTally.summary()`}} (per layer: tokens, choices, expert_fraction, router
    entropy, usage balance). Vision counts every token (patches and CLS); text counts real tokens only
    (attention_mask 1), since padding is never part of a caption, except for a SigLIP-MoE, whose text tower is fed
    fixed-length captions with no mask: there every position, padding included, is routed and shapes the pooled
    last position, so every position is counted.
    """
    config = model.config
    if not is_full_moe(config):
        raise not_moe_error(f"a {type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})")
    tallies = {}
    for tower in TOWERS:
        cfg = getattr(config, f"{tower}_config")
        if cfg.moe_layers:
            tallies[tower] = RoutingTally(cfg.moe_layers, cfg.num_experts, cfg.top_k)
    if not tallies:
        raise not_moe_error("this MoE model (no MoE layers in either tower)")
    if "text" in tallies and tokenizer is None:
        raise UserError("the CLIP-MoE has text MoE layers but no tokenizer; save one into its directory")
    with inference(model) as device:
        loader = pair_loader(pairs, image_processor, tokenizer if "text" in tallies else None,
                             text_max_length(model), batch_size, num_workers, pin_memory=device.type == "cuda",
                             fixed_length=fixed_length_text(model))
        for batch in tqdm(loader, desc=desc, unit="batch"):
            if "vision" in tallies:
                out = model.vision_model(pixel_values=batch["pixel_values"].to(device), output_router_logits=True)
                tallies["vision"].add(out.router_logits)
            if "text" in tallies:
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None
                out = model.text_model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                       output_router_logits=True)
                tallies["text"].add(out.router_logits, mask.reshape(-1).bool() if mask is not None else None)
    return {"towers": {tower: tally.summary() for tower, tally in tallies.items()}}


def routing_figure(stats: dict, name: str | None = None):
    """A heat map of `routing_stats` output (rows = MoE layers per tower, columns = experts, cells annotated
    with the fraction), titled with the model's `name`, as a matplotlib Figure on the Agg canvas (no display,
    no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(f"{tower} L{layer['layer']}", layer["expert_fraction"])
            for tower, t in stats["towers"].items() for layer in t["layers"]]
    width = max(len(fractions) for _, fractions in rows)
    grid = np.full((len(rows), width), np.nan)
    for r, (_, fractions) in enumerate(rows):
        grid[r, : len(fractions)] = fractions
    vmax = float(np.nanmax(grid)) or 1.0

    fig = Figure(figsize=(2.5 + 0.8 * width, 1.2 + 0.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for (r, c), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 * vmax else "black")
    ax.set_xticks(range(width), [f"expert {e}" for e in range(width)])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_title(f"{name + ': ' if name else ''}share of top-k choices per expert (uniform = 1/E)", fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction of choices")
    return fig
