"""Errors raised by adaptive-depth.

Every error derives from :class:`AdaptiveDepthError`. Errors caused by a value the caller passed also derive
from :class:`ValueError`, so ``except ValueError`` keeps working for code that does not know this library.
Messages quote the offending value and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AdaptiveDepthError",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DepthSpecError",
    "NoGateableBlocksError",
    "ScalingFactorError",
    "UnknownModelError",
    "WeightsUnavailableError",
]


class AdaptiveDepthError(Exception):
    """Base class of every error raised by adaptive-depth."""


class ScalingFactorError(AdaptiveDepthError, ValueError):
    """A scaling factor is not a number in (0, 1]."""


class DepthSpecError(AdaptiveDepthError, ValueError):
    """An explicit per-stage depth does not fit the model's stages."""


class ConfigError(AdaptiveDepthError, ValueError):
    """A configuration value is invalid."""


class UnknownModelError(AdaptiveDepthError, ValueError):
    """A model name or path does not resolve to a timm model, a transformers model or a saved repo."""


class NoGateableBlocksError(AdaptiveDepthError, ValueError):
    """The model has no block that can be skipped (no residual block whose output keeps its input's shape)."""


class WeightsUnavailableError(AdaptiveDepthError, OSError):
    """Pretrained weights were asked for but cannot be fetched (offline, or not in the local cache)."""


class CheckpointError(AdaptiveDepthError, ValueError):
    """A saved checkpoint is corrupt or does not match the model it is loaded into."""


class DataError(AdaptiveDepthError, ValueError):
    """A dataset cannot be loaded or does not look like image classification (columns, splits, classes)."""


class BudgetError(AdaptiveDepthError, ValueError):
    """No trained depth fits a compute budget, or the budget cannot be checked (no latency profile)."""
