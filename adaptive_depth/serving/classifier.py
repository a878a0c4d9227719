"""One serving worker's model: loaded once, its own preprocessing and class names, a depth policy, batches run at
the depth the policy decides.

Framework-free: the LitServe and Ray Serve servers both hold one :class:`ImageClassifier` per worker (process or
replica). A worker runs one batch at a time and switches the depth per batch with ``model.scaled(s)``: no copy of
the model per thread, no lock shared with other workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..budget import LatencyProfile
from ..errors import BudgetError, ConfigError
from ..model import AdaptiveDepth
from ..policy import check_scaling_factor
from .controller import DepthController, DepthPolicy, FixedDepth
from .requests import DEFAULT_MAX_PIXELS, image_bytes, open_image

__all__ = ["ImageClassifier", "PolicySpec", "profile_batch_sizes", "serving_profile"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicySpec:
    """How a server picks the depth of each batch: adaptive (the default), one fixed depth, or a static budget.

    Args:
        slo_ms: the latency objective of every request.
        scaling_factor: serve every batch at this depth instead of adapting.
        max_latency_ms: serve every batch at the depth ``model.set_budget(max_latency_ms=...)`` picks for a full
            batch: the largest whose ``max_batch_size`` images are measured within this many milliseconds.
        max_batch_size: the most requests in one batch.
        margin_ms: time kept aside from every deadline for moving answers back to the client.
    """

    slo_ms: float
    scaling_factor: float | None = None
    max_latency_ms: float | None = None
    max_batch_size: int = 16
    margin_ms: float = 0.0

    def __post_init__(self) -> None:
        for key in ("slo_ms", "max_latency_ms", "scaling_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        if self.scaling_factor is not None and self.max_latency_ms is not None:
            raise ConfigError("give a fixed scaling_factor or a max_latency_ms budget, not both")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if not 0 <= self.margin_ms < self.slo_ms:
            raise ConfigError(f"margin_ms must be in [0, slo_ms={self.slo_ms}), got {self.margin_ms!r}")

    def check_depths(self, trained: Sequence[float]) -> None:
        """Refuse a fixed depth the model was not trained at (its latency was never measured)."""
        if self.scaling_factor is not None and check_scaling_factor(self.scaling_factor) not in trained:
            raise ConfigError(
                f"the model was trained at the depths {list(trained)}, not at scaling_factor={self.scaling_factor}: "
                "serve one of those"
            )

    @property
    def name(self) -> str:
        """``adaptive``, ``s=0.5`` or ``budget=20ms``: for logs, metrics and benchmark tables."""
        if self.scaling_factor is not None:
            return f"s={self.scaling_factor:g}"
        if self.max_latency_ms is not None:
            return f"budget={self.max_latency_ms:g}ms"
        return "adaptive"

    def build(self, model: AdaptiveDepth, profile: LatencyProfile) -> DepthPolicy:
        """The policy object for ``model`` with ``profile`` (measured on the device it serves on)."""
        common = {"max_batch_size": self.max_batch_size, "margin_ms": self.margin_ms}
        depths = model.config.scaling_factors
        self.check_depths(depths)
        if self.scaling_factor is not None:
            return FixedDepth(profile, self.slo_ms, self.scaling_factor, **common)
        if self.max_latency_ms is not None:
            s = model.set_budget(max_latency_ms=self.max_latency_ms, batch_size=self.max_batch_size)
            return FixedDepth(profile, self.slo_ms, s, **common)
        return DepthController(profile, self.slo_ms, scaling_factors=depths, **common)


def profile_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a server profiles: powers of two below ``max_batch_size``, and ``max_batch_size``."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes) | {max_batch_size})


def serving_profile(
    model: AdaptiveDepth, max_batch_size: int, *, refresh: bool = False, warmup: int = 2, repeats: int = 5
) -> LatencyProfile:
    """The model's latency profile for serving on its device: the saved one if it fits, else measured now.

    The saved profile is used when it was measured on this device (and thread count, and dtype) at every batch
    size :func:`profile_batch_sizes` asks for; otherwise (or with ``refresh``) the depths are measured again and
    the log says why. The profile stays in memory: the model's folder is not written.
    """
    sizes = profile_batch_sizes(max_batch_size)
    param = next(model.parameters())
    saved, why = model.latency_profile, "asked to measure it again"
    if not refresh:
        if saved is None:
            why = "the model has no latency profile"
        else:
            try:
                saved.check_device(param.device, param.dtype)
                missing = [b for b in sizes if b not in saved.batch_sizes]
                if not missing:
                    return saved
                why = f"its profile has no batch sizes {missing}"
            except BudgetError:
                why = f"its profile was measured on {saved.device!r} ({saved.dtype}), another device"
    logger.warning("measuring latency at batch sizes %s before serving: %s", sizes, why)
    model.profile(batch_size=sizes, warmup=warmup, repeats=repeats)
    return LatencyProfile.from_dict(model.config.latency_profile)


class ImageClassifier:
    """A model held once, with its preprocessing, class names and depth policy.

    Args:
        model: the adaptive model, in eval mode on its serving device.
        spec: how the depth is chosen.
        profile: latency per depth and batch size on this device (:func:`serving_profile`).
        top_k: classes in each answer.
        max_pixels: the largest image accepted (decoded width x height).
    """

    def __init__(
        self,
        model: AdaptiveDepth,
        spec: PolicySpec,
        profile: LatencyProfile,
        *,
        top_k: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.model = model
        self.spec = spec
        self.policy = spec.build(model, profile)
        self.transform = model.create_transform()
        self.labels = model.id2label
        self.top_k = top_k
        self.max_pixels = max_pixels
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype

    @classmethod
    def load(
        cls,
        model_id: str,
        spec: PolicySpec,
        *,
        device: str | torch.device = "cpu",
        refresh_profile: bool = False,
        top_k: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> ImageClassifier:
        """Load a saved adaptive model (local folder or Hub id) onto ``device`` and make it ready to serve."""
        model = AdaptiveDepth.from_pretrained(model_id).eval().to(device)
        profile = serving_profile(model, spec.max_batch_size, refresh=refresh_profile)
        classifier = cls(model, spec, profile, top_k=top_k, max_pixels=max_pixels)
        classifier.warm_up(spec.max_batch_size)
        return classifier

    def warm_up(self, max_batch_size: int) -> None:
        """Run every depth the policy may choose once at batch 1 and at ``max_batch_size``.

        A process's first forward passes are slow (kernel selection, allocations); served to a client they would
        miss the deadline and teach the policy that the device is many times slower than its profile says.
        """
        example = self.transform(Image.new("RGB", tuple(self.model.config.input_size[:0:-1])))
        for batch_size in sorted({1, max_batch_size}):
            images = example.expand(batch_size, *example.shape)
            for s in self.policy.scaling_factors:
                self.classify(images, s)

    def preprocess(self, payload: Any) -> torch.Tensor:
        """One request body to the model's input tensor (raises :class:`BadRequestError` with the reason)."""
        return self.transform(open_image(image_bytes(payload), max_pixels=self.max_pixels))

    @torch.inference_mode()
    def classify(self, images: torch.Tensor | Sequence[torch.Tensor], scaling_factor: float) -> list[dict[str, Any]]:
        """Classify a batch at ``scaling_factor``: one answer per image, with the depth that produced it."""
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        with self.model.scaled(scaling_factor):
            out = self.model(batch.to(device=self._device, dtype=self._dtype))
        logits = out.logits if hasattr(out, "logits") else out  # transformers models return an output object
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return [
            {
                "label": self.labels.get(int(i[0]), str(int(i[0]))),
                "score": float(v[0]),
                "top_k": [{"label": self.labels.get(int(c), str(int(c))), "score": float(p)} for p, c in zip(v, i)],
                "scaling_factor": scaling_factor,
            }
            for v, i in zip(values.tolist(), indices.tolist())
        ]
