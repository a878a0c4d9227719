"""adaptive-depth: switchable depth for any timm or Hugging Face vision model."""

__version__ = "0.1.0"

from .config import AdaptiveDepthConfig, BaseModelRef, BlockSpec, StageSpec
from .errors import (
    AdaptiveDepthError,
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
from .model import AdaptiveDepth

__all__ = [
    "AdaptiveDepth",
    "AdaptiveDepthConfig",
    "AdaptiveDepthError",
    "BaseModelRef",
    "BlockSpec",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DepthGate",
    "DepthSpecError",
    "NoGateableBlocksError",
    "ScalingFactorError",
    "StageSpec",
    "UnknownModelError",
    "WeightsUnavailableError",
    "__version__",
]
