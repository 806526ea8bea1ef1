"""The projector file of LLaVA's stage 1 (`mm_projector.bin`): its keys, writing it, and checked loading.

LLaVA writes `{"model.mm_projector.0.weight": ..., ...}` with `torch.save`; its stage 2
(`--pretrain_mm_mlp_adapter`) and `load_pretrained_model(path, model_base, name)` read that file. LLaVA
loads it with a bare `load_state_dict`, so a projector trained for another tower fails with a shape dump;
here it fails with what was trained for what.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from encoder.utils.errors import UserError, first_line

PROJECTOR_FILE = "mm_projector.bin"
PROJECTOR_KEYWORD = "mm_projector"  # LLaVA's own selector: every key containing it
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def projector_parameter_names(model: nn.Module) -> list[str]:
    """Names of the projector's parameters in `model` (`model.mm_projector.0.weight`, ...)."""
    return [name for name, _ in model.named_parameters() if f"{PROJECTOR_KEYWORD}." in name]


def check_projector_type(projector_type: str) -> None:
    """LLaVA's projector types that have weights to train: linear and mlpNx_gelu."""
    if projector_type != "linear" and not _MLP.match(projector_type):
        raise UserError(f"--mm_projector_type {projector_type!r} is not trainable here; use linear or mlpNx_gelu "
                        "(LLaVA-1.5: mlp2x_gelu)")


def describe_projector(keys: list[str]) -> str:
    """'linear' or 'mlpNx_gelu' from a projector's state-dict keys (relative to the projector)."""
    if set(keys) == {"weight", "bias"}:
        return "linear"
    layers = {k.split(".")[0] for k in keys}
    if all(layer.isdigit() for layer in layers):
        return f"mlp{len(layers)}x_gelu"
    return "an unknown projector"


def read_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The projector tensors of a stage-1 output (the .bin file, or a directory holding one), keys relative
    to the projector (`0.weight`, ...), as LLaVA's `initialize_vision_modules` selects them."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise UserError(f"--pretrain_mm_mlp_adapter {path} does not exist; pass the mm_projector.bin of a "
                        "stage-1 run")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a file that is not a checkpoint
        raise UserError(f"cannot read {path} as a projector checkpoint ("
                        f"{first_line(err, with_type=True)}); pass a stage-1 mm_projector.bin") from None
    if not isinstance(weights, dict):
        raise UserError(f"{path} holds a {type(weights).__name__}, not a dict of projector weights")
    found = {k.split(PROJECTOR_KEYWORD + ".", 1)[1]: v for k, v in weights.items() if PROJECTOR_KEYWORD + "." in k}
    if not found:
        raise UserError(f"{path} holds no {PROJECTOR_KEYWORD} weights (keys such as {sorted(weights)[:3]}); "
                        "pass the mm_projector.bin of a stage-1 run")
    return found


def load_pretrained_projector(model: nn.Module, path: str | Path, tower_name: str) -> None:
    """Load a stage-1 projector into `model` after checking its type and both widths.

    Raises UserError naming the mismatch: another projector type, a tower of another hidden size (the
    projector must be retrained for this tower), or a language model of another width.
    """
    weights = read_projector_file(path)
    projector = model.get_model().mm_projector
    expected = projector.state_dict()
    have, want = describe_projector(list(weights)), describe_projector(list(expected))
    if set(weights) != set(expected):
        raise UserError(f"{path} holds a {have} projector but --mm_projector_type asks for {want}; pass "
                        f"--mm_projector_type {have} or retrain stage 1")
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    first, last = _linear_names(expected)
    trained_in, trained_out = weights[first].shape[1], weights[last].shape[0]
    if trained_in != linears[0].in_features:
        raise UserError(f"{path} was trained on {trained_in}-wide tower features but the vision tower {tower_name} "
                        f"is {linears[0].in_features} wide: the projector belongs to another tower; run stage 1 "
                        f"with --vision_tower {tower_name} and use its mm_projector.bin")
    if trained_out != linears[-1].out_features:
        raise UserError(f"{path} maps into a {trained_out}-wide language model but --model_name_or_path is "
                        f"{linears[-1].out_features} wide; use the stage-1 run made with this language model")
    projector.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})


def _linear_names(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    weights = sorted((k for k in state if k.endswith("weight")), key=lambda k: int(k.split(".")[0]) if "." in k else 0)
    return weights[0], weights[-1]
