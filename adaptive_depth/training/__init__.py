"""Cooperative training of adaptive-depth models (DESIGN.md section 4): objective, data, Accelerate trainer."""

from .config import TrainingConfig
from .data import (
    CLUTTERED_DIGITS,
    DIGITS,
    EMBEDDED_DATASETS,
    EpochSampler,
    ImageClassificationData,
    Loaders,
    TransformedDataset,
    build_transform,
    cluttered_digits_dataset,
    digits_dataset,
    load_image_classification_data,
    make_loaders,
)
from .evaluate import DepthResult, evaluate_accuracy
from .losses import CooperativeLogits, CooperativeLoss, cooperative_loss, kd_loss, sfsl_weights
from .players import CooperativeModel, logits_of
from .trainer import CooperativeTrainer, TrainingResult

__all__ = [
    "CLUTTERED_DIGITS",
    "DIGITS",
    "EMBEDDED_DATASETS",
    "CooperativeLogits",
    "CooperativeLoss",
    "CooperativeModel",
    "CooperativeTrainer",
    "DepthResult",
    "EpochSampler",
    "ImageClassificationData",
    "Loaders",
    "TrainingConfig",
    "TrainingResult",
    "TransformedDataset",
    "build_transform",
    "cluttered_digits_dataset",
    "cooperative_loss",
    "digits_dataset",
    "evaluate_accuracy",
    "kd_loss",
    "load_image_classification_data",
    "logits_of",
    "make_loaders",
    "sfsl_weights",
]
