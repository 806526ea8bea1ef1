"""Diversified Multiplet Upcycling (CLIP-MoE): Multistage Contrastive Learning, assembly, router training."""

from .clustering import accumulate_labels, joint_labels, kmeans_labels, merge_small_clusters
from .config import DMUConfig
from .pipeline import DMURun, run_dmu

__all__ = ["DMUConfig", "DMURun", "accumulate_labels", "joint_labels", "kmeans_labels", "merge_small_clusters",
           "run_dmu"]
