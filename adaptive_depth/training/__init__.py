"""Cooperative training of adaptive-depth models (docs/training.md): objective, data, Accelerate trainer."""

from ..report import DepthResult, TrainingReport, published_dataset_name
from ..saved import PLOT_NAME
from .config import TrainingConfig
from .data import ImageClassificationData, find_bad_images, load_image_classification_data
from .embedded import (
    CLUTTERED_DIGITS,
    DIGIT_PAIRS,
    DIGITS,
    EMBEDDED_DATASETS,
    cluttered_digits_dataset,
    digit_pairs_dataset,
    digits_dataset,
)
from .evaluate import evaluate_accuracy
from .loaders import EpochSampler, Loaders, TransformedDataset, make_loaders
from .losses import CooperativeLogits, CooperativeLoss, cooperative_loss, kd_loss, sfsl_weights
from .models import load_leader
from .output_dir import LOGS_DIR, RESULTS_NAME, TRAINING_CONFIG_NAME, OutputDir
from .parallel import accelerator_kwargs
from .players import CooperativeModel, logits_of
from .trainer import CooperativeTrainer, TrainingResult

__all__ = [
    "CLUTTERED_DIGITS",
    "DIGITS",
    "DIGIT_PAIRS",
    "EMBEDDED_DATASETS",
    "LOGS_DIR",
    "PLOT_NAME",
    "RESULTS_NAME",
    "TRAINING_CONFIG_NAME",
    "CooperativeLogits",
    "CooperativeLoss",
    "CooperativeModel",
    "CooperativeTrainer",
    "DepthResult",
    "EpochSampler",
    "ImageClassificationData",
    "Loaders",
    "OutputDir",
    "TrainingConfig",
    "TrainingReport",
    "TrainingResult",
    "TransformedDataset",
    "accelerator_kwargs",
    "cluttered_digits_dataset",
    "cooperative_loss",
    "digit_pairs_dataset",
    "digits_dataset",
    "evaluate_accuracy",
    "find_bad_images",
    "kd_loss",
    "load_image_classification_data",
    "load_leader",
    "logits_of",
    "make_loaders",
    "published_dataset_name",
    "sfsl_weights",
]
