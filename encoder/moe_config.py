"""The Mixture-of-Experts fields every MoE tower config adds to its family's dense tower config, and their checks.

Family-agnostic: a CLIP, SigLIP or SigLIP2 tower config with an empty `moe_layers` describes exactly the dense
tower, so every dense checkpoint has a MoE config that reproduces it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from transformers import CLIPTextConfig, PretrainedConfig
from transformers.activations import ACT2FN


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_indices(value):
    """`moe_layers` as a sorted list when every entry is an integer (numpy/torch integers included); any other
    value is returned as given, for `validate_moe` to reject (no '3' -> 3 or 1.5 -> 1 guessing)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    items = list(value)
    if any(isinstance(i, (bool, str, bytes)) for i in items):
        return value
    try:
        return sorted(operator.index(i) for i in items)
    except TypeError:
        return value


def check_forward_fields(tower: PretrainedConfig) -> None:
    """ValueError naming the tower field the forward pass reads and no weight shape checks that cannot work:
    they would otherwise fail at the first forward (an unknown activation) or give NaN without a word (a NaN
    layer_norm_eps, a text tower pooling at a token id it never sees). For the CLIP-MoE tower configs and for a
    dense base's (`encoder.convert.dense`)."""
    if not isinstance(tower.hidden_act, str) or tower.hidden_act not in ACT2FN:
        raise ValueError(f"hidden_act {tower.hidden_act!r} is not an activation transformers knows (CLIPs use "
                         "quick_gelu or gelu; the names are transformers.activations.ACT2FN's)")
    # NaN passes every comparison, so each bound is written as what must hold (NaN and inf fail it).
    if not _is_number(tower.layer_norm_eps) or not 0 < tower.layer_norm_eps < math.inf:
        raise ValueError(f"layer_norm_eps must be a finite number > 0, got {tower.layer_norm_eps!r}")
    if not _is_number(tower.attention_dropout) or not 0 <= tower.attention_dropout < 1:
        raise ValueError(f"attention_dropout must be a number in [0, 1), got {tower.attention_dropout!r}")
    eos = getattr(tower, "eos_token_id", None)
    if isinstance(tower, CLIPTextConfig) and not (_is_int(eos) and 0 <= eos < tower.vocab_size):
        raise ValueError(f"eos_token_id must be a token id below vocab_size ({tower.vocab_size}): the text tower "
                         f"pools the embedding at that token; got {eos!r}")


@dataclass(init=False, repr=False, eq=False, kw_only=True)
class MoEFields:
    r"""The MoE fields every MoE tower config adds to its family's dense tower config, and their validation.

    num_experts (`int`, defaults to 4): experts per MoE layer.
    top_k (`int`, defaults to 2): experts each token is routed to; their weights are renormalised to sum to 1.
    moe_layers (`list[int]`, defaults to `[]`): indices of the layers whose MLP is a MoE layer (empty = dense).
    router_jitter (`float`, defaults to 0.0): multiplicative uniform noise on router inputs while training, in
        [0, 1) (inputs scaled by a factor from 1 - router_jitter to 1 + router_jitter).
    capacity_factor (`float`, *optional*): None = dropless; else each expert takes at most
        `ceil(capacity_factor * tokens * top_k / num_experts)` token-choices per forward.
    aux_loss_coef (`float`, defaults to 0.01): weight of the load-balance loss in `aux_loss`.
    router_z_loss_coef (`float`, defaults to 0.001): weight of the router z-loss in `aux_loss`.
    output_router_logits (`bool`, defaults to False): the default of the forward's `output_router_logits`
        (router logits and auxiliary losses in the output), as in transformers' MoE configs (e.g. Mixtral).

    A dataclass that generates no methods: it only contributes fields, which transformers' config dataclass
    (`PreTrainedConfig.__init_subclass__`) places after the CLIP tower's own, in the order given here.
    """

    num_experts: int = 4
    top_k: int = 2
    moe_layers: list[int] | tuple[int, ...] = ()
    router_jitter: float = 0.0
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        self.moe_layers = layer_indices(self.moe_layers)
        super().__post_init__(**kwargs)

    def validate_moe(self) -> None:
        """Run by `@strict` after init: reject MoE settings that cannot describe a working model.

        The MoE fields are checked for type here too (a config.json may say "num_experts": "4"): `@strict` does
        not check the types of these fields, and a string or float would fail far from its cause, or not at all.
        """
        for name in ("num_experts", "top_k"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.moe_layers, list) or not all(_is_int(i) for i in self.moe_layers):
            raise TypeError(f"moe_layers must be a list of layer indices (integers), got {self.moe_layers!r}")
        for name in ("router_jitter", "aux_loss_coef", "router_z_loss_coef"):
            if not _is_number(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.capacity_factor is not None and not _is_number(self.capacity_factor):
            raise TypeError(f"capacity_factor must be a number or null (dropless), got {self.capacity_factor!r}")
        if not isinstance(self.output_router_logits, bool):
            raise TypeError(f"output_router_logits must be true or false, got {self.output_router_logits!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe_layers {bad} out of range: the tower has layers 0..{self.num_hidden_layers - 1}"
            )
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(f"moe_layers has duplicates: {self.moe_layers}")
        # NaN passes every comparison, so each bound is written as what must hold (NaN and inf fail it).
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
            raise ValueError(f"capacity_factor must be a finite number > 0 or null (dropless), got "
                             f"{self.capacity_factor}")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1) (router inputs are scaled by 1 +- router_jitter), "
                             f"got {self.router_jitter}")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0 (a loss weight), got {getattr(self, name)}")

    def validate_forward_fields(self) -> None:
        """Run by `@strict` after init: `check_forward_fields`."""
        check_forward_fields(self)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0
