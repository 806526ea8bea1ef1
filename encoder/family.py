"""Model families: which family (CLIP, SigLIP, SigLIP2, ...) a directory or config is, and whether it is MoE.

A family is one folder under `encoder/` (its configs, models, dense<->MoE weight map and tower rules) and one
`register_family(Family(...))` call in that folder's `__init__`. Everything else asks `family_of(...)` instead of
comparing `model_type` strings, so adding a family touches its folder and its registration only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from .utils.errors import UserError

KINDS = ("model", "vision", "text")  # the keys of `Family.moe_configs` / `moe_models`: the full model, each tower


@dataclass(frozen=True)
class WeightMap:
    """Where a family's dense FFN weights go in its MoE state dict, as names (no tensors).

    tower_prefix: tower ("vision", "text") -> the state-dict prefix of its weights in the full model.
    ffn_to_expert: dense FFN tensor name (under a layer's MLP) -> the name of the expert stack that copies it.
    layer_mlp: the MLP of layer `{layer}` within a tower, as a format string ending in '.'; the default is
        transformers' `encoder.layers.<i>.mlp` naming (CLIP, SigLIP). The router of a MoE layer is
        `<mlp>router.weight`, its experts `<mlp>experts.<name>`.
    head_mlp: tower -> the MLP of that tower's pooling head (SigLIP's vision attention-pooling head: 'head.mlp.'),
        which becomes MoE when the tower's MoE config has `moe_head` True; empty for families without one (CLIP).
    """

    tower_prefix: Mapping[str, str]
    ffn_to_expert: Mapping[str, str]
    layer_mlp: str = "encoder.layers.{layer}.mlp."
    head_mlp: Mapping[str, str] = field(default_factory=dict)

    def moe_mlps(self, tower: str, config, prefix: str | None = None) -> list[str]:
        """The state-dict prefixes ('...mlp.') of every MoE MLP of `tower` whose MoE config is `config`: its
        `moe_layers` in order, then the pooling head's MLP when `config.moe_head` is True. `prefix` is where the
        tower's keys start ('' for a tower's own export); default the tower's prefix in the full model."""
        prefix = f"{self.tower_prefix[tower]}." if prefix is None else prefix
        mlps = [prefix + self.layer_mlp.format(layer=layer) for layer in config.moe_layers]
        if getattr(config, "moe_head", False):
            if tower not in self.head_mlp:
                raise ValueError(f"moe_head is set for the {tower} tower, which has no pooling-head MLP to make MoE")
            mlps.append(prefix + self.head_mlp[tower])
        return mlps

    def mlp(self, tower: str, layer: int) -> str:
        """The state-dict prefix of layer `layer`'s MLP in `tower` of the full model."""
        return f"{self.tower_prefix[tower]}.{self.layer_mlp.format(layer=layer)}"

    def router_pattern(self, prefix: str = "") -> re.Pattern:
        """The router weight keys of a tower whose keys start with `prefix` ('vision_model.', or '' for a tower's
        own export), the layer index as group 1."""
        layer_mlp = re.escape(self.layer_mlp).replace(re.escape("{layer}"), r"(\d+)")
        return re.compile(re.escape(prefix) + layer_mlp + re.escape("router.weight"))

    def router_key(self, tower: str, layer: int) -> str:
        return self.mlp(tower, layer) + "router.weight"

    def expert_keys(self, tower: str, layer: int) -> dict[str, str]:
        """{expert stack key: the dense FFN key each of its experts copies} of one MoE layer."""
        mlp = self.mlp(tower, layer)
        return {f"{mlp}experts.{expert}": mlp + dense for dense, expert in self.ffn_to_expert.items()}

    def dense_ffn_key(self, expert_key: str) -> str | None:
        """`...mlp.experts.up_proj` -> `...mlp.fc1.weight` (the dense tensor every expert copies); None for a key
        that is not an expert stack."""
        head, sep, name = expert_key.rpartition(".experts.")
        if not sep:
            return None
        for dense_name, expert_name in self.ffn_to_expert.items():
            if name == expert_name:
                return f"{head}.{dense_name}"
        return None


@dataclass(frozen=True)
class Family:
    """What the family-agnostic code needs to know of one model family.

    name: short name used in messages and the CLI ("clip", "siglip", "siglip2").
    dense_model_types: transformers' `model_type`s of the dense full model and its towers, in `KINDS` order
        (full model, vision tower, text tower).
    moe_model_types: our MoE configs' `model_type`s, in the same order.
    has_cls_token: whether the vision tower's sequence starts with a class token (LLaVA's "patch" drops it).
    display_name: the family's name in messages ("CLIP" -> "CLIP" / "CLIP-MoE"); default `name`.
    moe_configs / moe_models: kind ("model", "vision", "text": `KINDS`) -> the MoE config / PreTrainedModel class,
        so family-agnostic code builds and loads a family's MoE model from the registry.
    weight_map: where the dense FFN weights go in the MoE state dict (`WeightMap`); None until the family has one.
    dense_vision_config / dense_vision_model / image_processor: transformers' classes of the dense vision tower
        and its image processor, which the LLaVA tower loads for a dense directory of this family.
    dense_configs / dense_models: kind -> transformers' dense config / PreTrainedModel class (`CLIPConfig`,
        `CLIPModel`, ...), so a dense base of any family is read, checked and loaded by the same code.
    moe_config_from_dense: (dense config, vision MoE fields, text MoE fields) -> the MoE config of the same kind, the
        dense config's fields kept and a tower given None left dense; what sparse upcycling starts from.
    sigmoid_loss: trained the SigLIP way (big_vision's recipe): the pairwise sigmoid loss with a learned
        `logit_bias`, captions padded to a fixed length with no mask and pooled at the last position. False: CLIP's
        way (InfoNCE; captions padded to the batch's longest, masked, pooled at the end-of-text token).
    patch_sequences: the vision tower takes variable-resolution patch sequences (SigLIP2's naflex: pixel_values
        [B, max_patches, C*p*p] with pixel_attention_mask and spatial_shapes) instead of [B, C, H, W] images.
    """

    name: str
    dense_model_types: tuple[str, ...]
    moe_model_types: tuple[str, ...]
    has_cls_token: bool
    display_name: str = ""
    moe_configs: Mapping[str, type] = field(default_factory=dict, repr=False)
    moe_models: Mapping[str, type] = field(default_factory=dict, repr=False)
    weight_map: WeightMap | None = field(default=None, repr=False)
    dense_vision_config: type | None = field(default=None, repr=False)
    dense_vision_model: type | None = field(default=None, repr=False)
    image_processor: type | None = field(default=None, repr=False)
    dense_configs: Mapping[str, type] = field(default_factory=dict, repr=False)
    dense_models: Mapping[str, type] = field(default_factory=dict, repr=False)
    moe_config_from_dense: Callable | None = field(default=None, repr=False)
    sigmoid_loss: bool = False
    patch_sequences: bool = False

    def label(self, moe: bool) -> str:
        """"CLIP-MoE" / "CLIP": what a message calls a (MoE or dense) model of this family."""
        name = self.display_name or self.name
        return f"{name}-MoE" if moe else name


@dataclass(frozen=True)
class FamilyMatch:
    """The answer of `family_of`: the family, whether the model is MoE, and its `model_type`."""

    family: Family
    is_moe: bool
    model_type: str

    @property
    def label(self) -> str:
        """What a message calls the model: "CLIP-MoE", "CLIP", ..."""
        return self.family.label(self.is_moe)

    @property
    def kind(self) -> str:
        """"model" (both towers), "vision" or "text" (one tower): the position of `model_type` in its family's
        tuple, read in `KINDS` order."""
        types = self.family.moe_model_types if self.is_moe else self.family.dense_model_types
        return KINDS[types.index(self.model_type)]


class UnknownFamily(UserError):
    """A model whose `model_type` no registered family claims."""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` (replacing one of the same name) and register its MoE classes with transformers
    (`register_with_transformers`); a `model_type` claimed by another family is a ValueError."""
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        shared = set(other.dense_model_types + other.moe_model_types) & set(family.dense_model_types + family.moe_model_types)
        if shared:
            raise ValueError(f"family {family.name!r} claims model_type(s) {sorted(shared)} of family {other.name!r}")
    _FAMILIES[family.name] = family
    register_with_transformers(family)
    return family


def register_with_transformers(family: Family) -> None:
    """What transformers must know of the family's MoE classes (those it declares): `AutoConfig` /
    `AutoModel.from_pretrained(DIR)` of a saved MoE directory return them, and a tower model loaded from a full
    directory takes its weights from under its tower's prefix (`weight_map.tower_prefix`), as transformers' own
    tower models do. Idempotent."""
    for kind, config_class in family.moe_configs.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        if kind in family.moe_models:
            AutoModel.register(config_class, family.moe_models[kind], exist_ok=True)
    if family.weight_map is None:
        return
    for tower, prefix in family.weight_map.tower_prefix.items():
        if tower in family.moe_models:
            register_checkpoint_conversion_mapping(family.moe_models[tower].__name__,
                                                   [PrefixChange(prefix_to_remove=prefix)], overwrite=True)


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def family_named(name: str) -> Family:
    """The registered family called `name`; UnknownFamily (one line, the families known) for another name."""
    if name not in _FAMILIES:
        known = ", ".join(_FAMILIES) or "none registered"
        raise UnknownFamily(f"no model family {name!r}; the families this toolkit knows: {known}")
    return _FAMILIES[name]


def _model_type(source) -> tuple[str | None, str]:
    """(model_type, where) of a directory / its config.json, a config dict or a PretrainedConfig."""
    if isinstance(source, PretrainedConfig):
        return getattr(source, "model_type", None) or None, f"config {type(source).__name__}"
    if isinstance(source, Mapping):
        return source.get("model_type"), "config"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        file = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError, TypeError):
            return None, str(source)
        return (config.get("model_type") if isinstance(config, dict) else None), str(source)
    return None, repr(source)


def find_family(source) -> FamilyMatch | None:
    """The family of `source` (a model directory, its config.json, a config dict or a PretrainedConfig), or None
    when it is not a model directory / config of a registered family."""
    model_type, _ = _model_type(source)
    for family in _FAMILIES.values():
        if model_type in family.moe_model_types:
            return FamilyMatch(family, True, model_type)
        if model_type in family.dense_model_types:
            return FamilyMatch(family, False, model_type)
    return None


def family_of(source) -> FamilyMatch:
    """`find_family`, or UnknownFamily (a UserError, one line) naming the model_type and the families known."""
    match = find_family(source)
    if match is None:
        model_type, where = _model_type(source)
        known = ", ".join(f.name for f in _FAMILIES.values()) or "none registered"
        what = f"a {model_type!r} model" if model_type else "not a model directory with a readable config.json"
        raise UnknownFamily(f"{where} is {what}, of no model family this toolkit knows ({known}); give a directory "
                            "(or hub id) of one of those")
    return match


def read_model_type(source) -> str | None:
    """The `model_type` of a model directory (or its config.json, a config dict or a PretrainedConfig), or None when
    it has no readable config: the one reader of a directory's model type."""
    return _model_type(source)[0]


def is_full_moe(source) -> bool:
    """True when `source` (a model directory, its config.json, a config dict or a PretrainedConfig) is the full MoE
    model (both towers, e.g. a `CLIPMoEModel`) of a registered family, not one tower's export nor a dense model."""
    match = find_family(source)
    return match is not None and match.is_moe and match.kind == "model"


def is_moe_dir(path: str | os.PathLike | None) -> bool:
    """True when `path` is a local directory holding a MoE model of any registered family (full or a tower)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return False
    match = find_family(path)
    return match is not None and match.is_moe
