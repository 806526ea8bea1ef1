"""Loading any model a command may be given (dense or MoE, of any family: CLIP, SigLIP, SigLIP2) together with what
preprocesses its inputs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .convert.dense import image_processor_for, load_dense_clip, tokenizer_for
from .family import is_full_moe
from .model_dir import full_model_class, load_clip_moe
from .utils.errors import NonFiniteValues


@dataclass
class LoadedCLIP:
    """A family's full dense or MoE model (`CLIPModel`, `CLIPMoEModel`, `SiglipModel`, `SiglipMoEModel`, ...; eval
    mode, CPU), its image processor and tokenizer (None if it has none)."""

    model: PreTrainedModel
    image_processor: object
    tokenizer: object | None
    source: str

    @property
    def is_moe(self) -> bool:
        return is_full_moe(self.model.config)


def load_clip(spec: str | Path) -> LoadedCLIP:
    """A dense base of any family (directory, hub id, open_clip:NAME, a SigLIP's included) or a MoE directory of any
    family, validated (`encoder.model_dir`): a directory whose config, weights, image processor or tokenizer is
    damaged is a UserError, never a model."""
    if Path(spec).is_dir() and is_full_moe(spec):
        path = Path(spec)
        model = load_clip_moe(path, full_model_class(path)).eval()
        return LoadedCLIP(model, image_processor_for(path, model.config), tokenizer_for(path), str(spec))
    dense = load_dense_clip(str(spec))
    return LoadedCLIP(dense.model, dense.image_processor, dense.tokenizer, dense.source)


def require_finite_weights(model: torch.nn.Module, source: str | Path | Callable[[str, torch.Tensor], str],
                           names: Collection[str] | None = None) -> None:
    """NonFiniteValues (a UserError) naming the first parameter or buffer of `model` (or of `names`) that holds NaN
    or inf, and where it came from: `source` is the file or directory it was loaded from, or a function of the
    tensor's name and the tensor that says so (LLaVA's parts come from different flags). Call it before training.

    Frozen tensors count as much as trained ones: without this check a NaN weight anywhere in the forward pass
    surfaces at the first step as a NaN loss, which reads as a too-high learning rate. One pass, no copy.
    """
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if (names is not None and name not in names) or not tensor.is_floating_point() or tensor.is_meta:
            continue
        with torch.no_grad():
            bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            where = source(name, tensor) if callable(source) else source
            raise NonFiniteValues(
                f"{where}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}, so every loss computed "
                "from it would be NaN; start from weights that are finite (an earlier checkpoint, or a sound base)"
            )
