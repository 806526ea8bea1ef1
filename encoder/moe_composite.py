"""What every family's full-model MoE config adds to transformers' composite config (`CLIPConfig`, `SiglipConfig`,
`Siglip2Config`): the `output_router_logits` default of the full model, and the construction from a dense config.

Family-agnostic, as `moe_config.MoEFields` is for the tower configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


def tower_dict(tower: PretrainedConfig) -> dict:
    """A tower config's fields, without what names its class or origin (so another config class can take them)."""
    d = tower.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return d


@dataclass(init=False, repr=False, eq=False, kw_only=True)
class MoECompositeFields:
    r"""The field a family's full-model MoE config adds to its transformers composite config.

    output_router_logits (`bool`, defaults to False): True makes router logits the default of the full model's
        forward for both towers; False leaves it to each tower config's own field.

    A dataclass that generates no methods, listed before the transformers config (as `MoEFields` is): it only
    contributes the field.
    """

    output_router_logits: bool = False

    @classmethod
    def from_dense(cls, dense: PretrainedConfig, vision_moe: dict | None = None, text_moe: dict | None = None,
                   **fields):
        """The MoE config of a dense composite config: its towers' fields plus MoE fields per tower (dense where
        None), and the composite `fields` the family carries over."""
        return cls(
            text_config={**tower_dict(dense.text_config), **(text_moe or {})},
            vision_config={**tower_dict(dense.vision_config), **(vision_moe or {})},
            **fields,
        )
