"""Model families: which family (CLIP, SigLIP, SigLIP2, ...) a directory or config is, and whether it is MoE.

A family is one folder under `encoder/` (its configs, models, dense<->MoE weight map and tower rules) and one
`register_family(Family(...))` call in that folder's `__init__`. Everything else asks `family_of(...)` instead of
comparing `model_type` strings, so adding a family touches its folder and its registration only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from .utils.errors import UserError


@dataclass(frozen=True)
class Family:
    """What the family-agnostic code needs to know of one model family.

    name: short name used in messages and the CLI ("clip", "siglip", "siglip2").
    dense_model_types: transformers' `model_type`s of the dense full model and its towers.
    moe_model_types: our MoE configs' `model_type`s (full model first, then the towers).
    has_cls_token: whether the vision tower's sequence starts with a class token (LLaVA's "patch" drops it).
    """

    name: str
    dense_model_types: tuple[str, ...]
    moe_model_types: tuple[str, ...]
    has_cls_token: bool


@dataclass(frozen=True)
class FamilyMatch:
    """The answer of `family_of`: the family, whether the model is MoE, and its `model_type`."""

    family: Family
    is_moe: bool
    model_type: str


class UnknownFamily(UserError):
    """A model whose `model_type` no registered family claims."""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` (replacing one of the same name); a `model_type` claimed by another family is a ValueError."""
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        shared = set(other.dense_model_types + other.moe_model_types) & set(family.dense_model_types + family.moe_model_types)
        if shared:
            raise ValueError(f"family {family.name!r} claims model_type(s) {sorted(shared)} of family {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


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


def is_moe_dir(path: str | os.PathLike | None) -> bool:
    """True when `path` is a local directory holding a MoE model of any registered family (full or a tower)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return False
    match = find_family(path)
    return match is not None and match.is_moe
