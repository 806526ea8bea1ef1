"""Which parameters a training run may change: FFNs (MCL stages), routers (DMU's last step) or everything.

"ffn" means the encoder layers' MLPs (dense or experts), the ones a MoE recipe turns into experts: SigLIP's
attention-pooling head also has an MLP (`vision_model.head.mlp`), which stays dense in the MoE by default, so an
MCL stage that trained it would change a weight the assembled MoE takes from the base instead."""

from __future__ import annotations

import re

from torch import nn

from encoder.utils.errors import UserError

TRAINABLE_CHOICES = ("all", "ffn", "router")
_FFN = re.compile(r"\.layers\.\d+\.mlp\.(fc1|fc2|experts)\.")
_ROUTER = re.compile(r"\.mlp\.router\.")


def is_trainable(name: str, which: str) -> bool:
    if which == "all":
        return True
    if which == "ffn":
        return bool(_FFN.search(name))
    if which == "router":
        return bool(_ROUTER.search(name))
    raise UserError(f"trainable {which!r} not understood: use one of {', '.join(TRAINABLE_CHOICES)}")


def select_trainable(model: nn.Module, which: str) -> list[str]:
    """Set requires_grad on the chosen parameters only; return their names (an error if there are none)."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, which))
        if param.requires_grad:
            names.append(name)
    if not names:
        what = "no routers (it is a dense CLIP)" if which == "router" else f"no {which} parameters"
        raise UserError(f"--trainable {which}: the model has {what}; choose another --trainable")
    return names
