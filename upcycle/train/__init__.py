"""Contrastive training of CLIP and CLIP-MoE models (accelerate: one CPU process or several GPUs)."""

from .losses import clip_contrastive_loss, gather_with_grad
from .params import TRAINABLE_CHOICES, select_trainable
from encoder.errors import TrainingDiverged
from encoder.training import ClusterBatchSampler

from .trainer import ContrastiveTrainer, TrainConfig, latest_checkpoint, load_trained_parameters

__all__ = [
    "TRAINABLE_CHOICES", "ClusterBatchSampler", "ContrastiveTrainer", "TrainConfig", "TrainingDiverged",
    "clip_contrastive_loss", "gather_with_grad", "latest_checkpoint", "load_trained_parameters", "select_trainable",
]
