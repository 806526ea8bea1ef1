"""Sparse upcycling (the CLIP-UP recipe) of a dense base of any family (CLIP, SigLIP, SigLIP2): every expert an
exact copy of the dense MLP, routers new.

With identical experts and renormalised top-k weights the MoE model computes exactly the dense function,
so continued training starts from the dense model's quality.

Two ways to the same result: `sparse_upcycle` builds the MoE model (a `CLIPMoEModel`, `SiglipMoEModel`, ...) in
memory (for code that goes on to train it); `write_sparse_upcycled` streams it to disk tensor by tensor — every
expert stack is the dense FFN tensor written E times, never an [E, ...] tensor in memory — which is what
`upcycle sparse` uses, so a real-size MoE costs about one tensor of memory, not base + MoE model + copies.
`layerwise_output_diff` then checks the written weights against the base one module at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from encoder.convert.dense import DenseCLIPSource, load_dense_clip
from encoder.family import family_of
from encoder.tensor_stream import (
    SafetensorsCheckpoint,
    TensorSpec,
    lazy_model,
    parameters_on_meta,
    write_safetensors,
)
from encoder.utils.errors import UserError

from ..eval.function_check import max_output_diff, random_inputs
from .assemble import assemble_clip_moe, moe_config_for, new_routers, weight_map_of

SAFETENSORS_METADATA = {"format": "pt"}  # what save_pretrained writes


def sparse_upcycle(
    base: PreTrainedModel | str,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: str | Sequence[int] = "all",
    towers: Sequence[str] = ("vision", "text"),
    seed: int = 0,
    moe_head: bool = False,
    **moe_fields,
) -> PreTrainedModel:
    """Upcycle a dense base (a `CLIPModel` / `SiglipModel` / `Siglip2Model`, a directory, a hub id or
    `open_clip:NAME[:CKPT]`) into the MoE model of its family.

    moe_layers: "all", "even", "odd", "last:N" or a list of layer indices, applied to each tower in `towers`.
    moe_head: also make the vision pooling head's MLP MoE (SigLIP's attention-pooling head).
    moe_fields: further MoE config fields (router_jitter, capacity_factor, aux_loss_coef, router_z_loss_coef).
    """
    dense = base if isinstance(base, PreTrainedModel) else load_dense_clip(base).model
    config = moe_config_for(dense, num_experts, top_k, moe_layers, towers, moe_head=moe_head, **moe_fields)
    return assemble_clip_moe(dense, config, seed=seed)


def moe_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The MoE model of `config`'s family with meta-device parameters: names, shapes and dtypes of what will be
    written, and what the parameter summary and model card are computed from, at no memory cost."""
    with parameters_on_meta():
        model = family_of(config).family.moe_models["model"](config)
    return model.to(dtype).eval()


def write_sparse_upcycled(base: DenseCLIPSource, config: PretrainedConfig, out_dir: str | Path, seed: int = 0,
                          progress=None) -> PreTrainedModel:
    """Write the sparse-upcycled `config.json` + `model.safetensors` of `base` into `out_dir` (an existing,
    normally temporary, directory) tensor by tensor, and return the meta skeleton of the written model.

    The files equal what `sparse_upcycle(...)` + `save_pretrained` write (same tensors, same routers for the
    same seed, same dtype, same file layout); tests/upcycle/recipes/test_sparse_streaming.py checks it byte for byte.
    """
    out_dir = Path(out_dir)
    skeleton = moe_skeleton(config, base.dtype)
    specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in skeleton.state_dict().items()}
    routers = new_routers(config, seed)  # small ([E, width] per layer), drawn in the in-memory path's order
    weight_map = weight_map_of(config)
    sources = {}
    for name, spec in specs.items():
        if name in routers:
            continue
        dense_key = weight_map.dense_ffn_key(name)
        source_key = dense_key or name
        expected = spec.shape[1:] if dense_key else spec.shape
        if source_key not in base.tensors:
            raise UserError(f"{base.source}: its weights lack {source_key}, which its config.json implies; "
                            "re-save or re-download the model")
        found = base.tensors.spec(source_key).shape
        if found != expected:
            raise UserError(f"{base.source}: {source_key} has shape {list(found)} but its config.json implies "
                            f"{list(expected)}; re-save or re-download the model")
        sources[name] = (source_key, spec.shape[0] if dense_key else None)

    def produce(name: str):
        if name in routers:
            return routers.pop(name).to(specs[name].dtype)
        source_key, copies = sources[name]
        tensor = _cast(base.tensors.get(source_key), specs[name].dtype)
        return tensor if copies is None else itertools.repeat(tensor, copies)

    write_safetensors(out_dir / "model.safetensors", specs, produce, SAFETENSORS_METADATA, progress)
    save_config(skeleton, out_dir)
    return skeleton


def save_config(model: PreTrainedModel, out_dir: Path) -> None:
    """config.json exactly as `save_pretrained` writes it (it records the dtype and the architecture)."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def layerwise_output_diff(base: DenseCLIPSource, moe_dir: str | Path, inputs: dict | None = None) -> dict:
    """`max_output_diff` of the dense base vs the MoE model written in `moe_dir` (`layerwise_check`)."""
    return layerwise_check(base, moe_dir, inputs)[0]


@torch.no_grad()
def layerwise_check(base: DenseCLIPSource, moe_dir: str | Path, inputs: dict | None = None) -> tuple[dict, float]:
    """`max_output_diff` of the dense base vs the MoE model written in `moe_dir`, on a small random batch
    (`random_inputs`), and the largest |value| among the dense outputs it compares: float rounding scales with it (a
    27-layer SO400M with random weights carries hidden states where 1e-5 is below fp32's resolution).

    Both models run with meta parameters that are read from disk module by module during the forward
    (`encoder.tensor_stream.lazy_model`), so the check costs one module's weights (the largest: one layer's
    expert stack, or the token embedding) plus activations — not the 1x dense + 1x MoE of loading both.
    An in-memory base (open_clip, hub) is used as it is.
    """
    moe_tensors = SafetensorsCheckpoint(moe_dir)
    try:
        family = family_of(moe_dir).family
        config = family.moe_configs["model"].from_pretrained(moe_dir)
        moe = lazy_model(lambda: family.moe_models["model"](config), moe_tensors, dtype=base.dtype)
        dense_class = family.dense_models["model"]
        dense = base.model if base.model is not None else lazy_model(lambda: dense_class(base.config), base.tensors,
                                                                      dtype=base.dtype)
        largest = []
        hook = dense.register_forward_hook(lambda module, args, output: largest.append(_largest_value(output)))
        try:
            diff = max_output_diff(dense, moe, inputs if inputs is not None else random_inputs(dense))
        finally:
            hook.remove()
        return diff, largest[0]
    finally:
        moe_tensors.close()


def _largest_value(output) -> float:
    """The largest |value| of the embeddings and hidden states `max_output_diff` compares."""
    tensors = [output.image_embeds, output.text_embeds, *output.vision_model_output.hidden_states,
               *output.text_model_output.hidden_states]
    return max(t.abs().max().item() for t in tensors)


def within_rounding(diff: float, largest: float) -> bool:
    """Whether a dense-vs-MoE difference is float rounding: at most 1e-5, or 1e-6 of the largest output (fp32 keeps
    about 7 digits; the experts sum their products in another order than the dense MLP)."""
    return diff <= max(1e-5, 1e-6 * largest)
