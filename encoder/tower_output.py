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
from .outputs import CLIPMoEOutputWithPooling

OUTPUT_FLAGS_DOC = """
        `output_hidden_states`: True for all num_hidden_layers + 1 states (entry 0 the encoder's input, the last one
        before the final layer norm, as in transformers' CLIP and SigLIP), or the index / list of indices of the states
        to keep (negative ones count from the end): the others are None, so `hidden_states[i]` still indexes by layer.
        `output_router_logits`: one fp32 [tokens, num_experts] tensor per MoE layer (then one [batch, num_experts] for
        a MoE attention-pooling head), and the auxiliary losses. Each flag left None is the config's."""


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


class MoEImageTower(MoETower):
    """The forward of a tower over fixed-size images (`CLIPVisionModel`'s and `SiglipVisionModel`'s interface); the
    family writes `_features(pixel_values, interpolate_pos_encoding, **kwargs)`, its pass under `capture_outputs`."""

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPMoEOutputWithPooling | tuple:
        """pixel_values [B, C, H, W] -> last_hidden_state [B, positions, d], pooler_output [B, d] (the tower's
        docstring says which positions and what pools)."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        inputs = dict(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        flags = dict(kwargs, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                     output_router_logits=output_router_logits)
        return tower_output(self, self._features, None, return_dict, inputs, flags)

    forward.__doc__ += OUTPUT_FLAGS_DOC


class MoETextTower(MoETower):
    """The forward of a text tower (`CLIPTextModel`'s and `SiglipTextModel`'s interface); the family writes
    `_real_tokens(inputs)`, which says which tokens are padding, and `_features(**inputs, **kwargs)`, its pass under
    `capture_outputs`."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPMoEOutputWithPooling | tuple:
        """input_ids [B, N] -> last_hidden_state [B, N, d], pooler_output [B, d'] (the tower's docstring says what
        pools).

        Padding tokens (attention_mask == 0; without a mask, the tower's rule) are routed like any token but do not
        count in the auxiliary losses and, in MoE layers with a `capacity_factor`, take no expert capacity where the
        tower's `_capacity_tokens` says so."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        real_tokens = self._real_tokens(inputs)
        inputs["token_mask"] = self._capacity_tokens(inputs, real_tokens)
        flags = dict(kwargs, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                     output_router_logits=output_router_logits)
        return tower_output(self, self._features, real_tokens, return_dict, inputs, flags)

    forward.__doc__ += OUTPUT_FLAGS_DOC

    def _real_tokens(self, inputs: dict) -> torch.Tensor | None:
        """The real (not padding) tokens of `inputs` [B, N] (None: all), by `attention_mask` when it is given, else by
        the family's rule, which may add to `inputs` what its `_features` needs."""
        raise NotImplementedError(f"{type(self).__name__} must say which of its tokens are padding")

    def _capacity_tokens(self, inputs: dict, real_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The tokens [B, N] that take expert capacity in the MoE layers (None: all), which `_features` gets as its
        `token_mask`: the real tokens, when no real token reads the padding's outputs (the family overrides it where
        one does: zeroing the padding's MLP output would then change the real tokens)."""
        return real_tokens


def install_recording_hooks(tower: PreTrainedModel) -> None:
    """Install `capture_outputs`' hooks when the tower is built rather than at the first call that asks for an
    output: installing takes a lock, which torch.compile(fullgraph=True) cannot trace. They record nothing unless
    asked."""
    maybe_install_capturing_hooks(tower)


def flag(value: bool | None, default: bool | None) -> bool:
    """A forward argument, or the config's default when the argument is None."""
    return bool(default) if value is None else bool(value)
