"""`python -m upcycle dmu`: a DMUConfig and whether to continue the run its work directory holds."""

from __future__ import annotations

from dataclasses import dataclass

from encoder.utils.options import option_like, options_of

from ...train.config import TrainOutput
from ...train.trainer import check_launch_fits
from .config import DMUConfig
from .pipeline import run_dmu


@dataclass(frozen=True)
class DMUCommand:
    """Diversified Multiplet Upcycling: MCL stages, assembly, router training

    Builds a CLIP-MoE whose experts learned different features: stage s encodes the data with stage s-1,
    clusters image and text embeddings, and fine-tunes the base's FFNs with every global batch drawn from one
    accumulated cluster; expert i = stage i's FFNs (expert 0 = the base); then only the routers train.
    Interrupted runs continue with --resume.
    """

    dmu: DMUConfig = options_of(DMUConfig)
    # not a DMU setting: the same settings either start afresh or continue (the manifest says which stages are done)
    resume: bool = option_like(TrainOutput, "resume")


def run_dmu_command(cmd: DMUCommand) -> int:
    # Before the base loads and the clustering runs: a launch that contradicts the training phases is refused now.
    check_launch_fits(cmd.dmu.train_config("ffn", "MCL stage"))
    run_dmu(cmd.dmu, resume=cmd.resume)
    return 0
