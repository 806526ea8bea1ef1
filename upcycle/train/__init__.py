"""Contrastive training of CLIP and SigLIP models, dense or MoE, each with its family's loss (accelerate: one CPU
process or several GPUs)."""

from encoder.training import ClusterBatchSampler
from encoder.utils.errors import TrainingDiverged

from .config import TrainConfig
from .losses import clip_contrastive_loss, gather_with_grad, siglip_sigmoid_loss
from .params import TRAINABLE_CHOICES, select_trainable
from .trainer import ContrastiveTrainer, latest_checkpoint, load_trained_parameters, sigmoid_loss_for

__all__ = [
    "TRAINABLE_CHOICES", "ClusterBatchSampler", "ContrastiveTrainer", "TrainConfig", "TrainingDiverged",
    "clip_contrastive_loss", "gather_with_grad", "latest_checkpoint", "load_trained_parameters", "select_trainable",
    "siglip_sigmoid_loss", "sigmoid_loss_for",
]
