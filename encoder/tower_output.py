"""What every family's MoE tower does around its own pass: the output flags, the auxiliary losses, the hooks.

Family-agnostic: a tower (CLIP-MoE, SigLIP-MoE, ...) runs its layers under transformers' `capture_outputs`, which
records hidden states, attentions and router logits as asked; `tower_output` adds the auxiliary losses computed
from the recorded router logits alone, as transformers' MoE models compute theirs.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from .moe import routing_losses


def tower_output(tower: PreTrainedModel, features, token_mask: torch.Tensor | None, return_dict: bool | None,
                 inputs: dict, flags: dict):
    """A tower's output: `features(**inputs)` (its pass under `capture_outputs`, which records what `flags` ask for:
    `output_*` and the forward's other keyword arguments, each left None taken from the tower's config), plus the
    auxiliary losses of the router logits it recorded.

    The encoder layers' losses are over the real tokens (`token_mask` [B, N], None = all); logits recorded after the
    `moe_layers`' (a MoE head's: one pooled token per image, every one real) over all their rows. A tower without
    MoE layers records no router logits: its routing fields stay None.
    """
    config = tower.config
    kwargs = {name: value for name, value in flags.items() if value is not None}
    if not config.is_moe:
        kwargs["output_router_logits"] = False
    out = features(return_dict=True, **inputs, **kwargs)
    if out.router_logits is not None:
        masks = [token_mask] * len(config.moe_layers) + [None] * (len(out.router_logits) - len(config.moe_layers))
        losses = [routing_losses(logits, config.top_k, mask) for logits, mask in zip(out.router_logits, masks)]
        out.load_balance_loss = torch.stack([balance for balance, _ in losses]).mean()
        out.router_z_loss = torch.stack([z for _, z in losses]).mean()
        out.aux_loss = config.aux_loss_coef * out.load_balance_loss + config.router_z_loss_coef * out.router_z_loss
    return out if flag(return_dict, config.return_dict) else out.to_tuple()


class MoETower:
    """Mixed in before a family's MoE PreTrainedModel by each of its tower models: `install_recording_hooks` runs
    when the tower is built (at the end of `post_init`)."""

    def post_init(self) -> None:
        super().post_init()
        install_recording_hooks(self)


def install_recording_hooks(tower: PreTrainedModel) -> None:
    """Install `capture_outputs`' hooks when the tower is built rather than at the first call that asks for an
    output: installing takes a lock, which torch.compile(fullgraph=True) cannot trace. They record nothing unless
    asked."""
    maybe_install_capturing_hooks(tower)


def flag(value: bool | None, default: bool | None) -> bool:
    """A forward argument, or the config's default when the argument is None."""
    return bool(default) if value is None else bool(value)
