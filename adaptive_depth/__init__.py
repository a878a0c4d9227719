"""adaptive-depth: switchable depth for any timm or Hugging Face vision model."""

__version__ = "0.1.0"

from .auto_classes import register_with_transformers
from .budget import LatencyProfile
from .config import AdaptiveDepthConfig, BaseModelRef, BlockSpec, StageSpec
from .errors import (
    AdaptiveDepthError,
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    DepthSpecError,
    NoGateableBlocksError,
    ScalingFactorError,
    UnknownModelError,
    WeightsUnavailableError,
)
from .gates import DepthGate
from .model import AdaptiveDepth, pretrained_or_random

register_with_transformers()  # pipeline() / Auto classes on a saved model: an error that says what to do instead

__all__ = [
    "AdaptiveDepth",
    "AdaptiveDepthConfig",
    "AdaptiveDepthError",
    "BaseModelRef",
    "BlockSpec",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DepthGate",
    "DepthSpecError",
    "LatencyProfile",
    "NoGateableBlocksError",
    "ScalingFactorError",
    "StageSpec",
    "UnknownModelError",
    "WeightsUnavailableError",
    "__version__",
    "pretrained_or_random",
]
