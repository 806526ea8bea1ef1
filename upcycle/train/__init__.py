"""Contrastive training of CLIP and CLIP-MoE models (accelerate: one CPU process or several GPUs)."""

from encoder.training import ClusterBatchSampler
from encoder.utils.errors import TrainingDiverged

from .config import TrainConfig
from .losses import clip_contrastive_loss, gather_with_grad
from .params import TRAINABLE_CHOICES, select_trainable
from .trainer import ContrastiveTrainer, latest_checkpoint, load_trained_parameters

__all__ = [
    "TRAINABLE_CHOICES", "ClusterBatchSampler", "ContrastiveTrainer", "TrainConfig", "TrainingDiverged",
    "clip_contrastive_loss", "gather_with_grad", "latest_checkpoint", "load_trained_parameters", "select_trainable",
]
