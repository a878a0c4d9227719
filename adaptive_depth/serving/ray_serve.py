"""A Ray Serve deployment of a depth-switchable image classifier: replicas on many machines, each with its own
depth controller.

Ray Serve routes requests to replicas and scales the number of replicas with the load (its autoscaling); inside
each replica, ``@serve.batch`` forms the batches and the replica's depth policy picks the depth of each one from
the arrival times of its requests. The two act on different time scales: a new replica takes seconds to start,
a depth switch microseconds, so the depth absorbs bursts while the autoscaler follows the trend.

    serve run adaptive_depth.serving.ray_serve:app model=out/finetune slo_ms=50 max_replicas=4

Needs the ``ray`` extra: ``pip install adaptive-depth[ray]``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import ConfigError
from .classifier import ImageClassifier, PolicySpec
from .requests import BadRequestError

__all__ = ["AdaptiveDepthDeployment", "app"]


@serve.deployment
class AdaptiveDepthDeployment:
    """One replica: the model loaded once, requests decoded as they come, batches classified at the policy's depth.

    Args:
        model_id: a saved adaptive-depth model: local folder (on every node) or Hub id.
        spec: the depth policy, SLO and largest batch.
        device: where the replica runs its model.
        **kwargs: :meth:`ImageClassifier.load`'s other arguments (``top_k``, ``max_pixels``, ``refresh_profile``).
    """

    def __init__(self, model_id: str, spec: PolicySpec, device: str = "cpu", **kwargs: Any) -> None:
        self.classifier = ImageClassifier.load(model_id, spec, device=device, **kwargs)
        self.classify_batch.set_max_batch_size(spec.max_batch_size)

    async def __call__(self, request: Request) -> Any:
        arrival = time.monotonic()
        try:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type == "application/json":
                payload: Any = await request.json()
            elif content_type == "multipart/form-data":
                payload = await request.form()
            else:
                raise BadRequestError(415, f"content type {content_type!r} is not accepted: send application/json "
                                      'or multipart/form-data')  # fmt: skip
            image = self.classifier.preprocess(payload)
        except BadRequestError as e:
            return JSONResponse({"detail": e.reason}, status_code=e.status_code)
        except ValueError as e:  # a JSON body that does not parse
            return JSONResponse({"detail": f"the body cannot be read: {e}"}, status_code=400)
        return await self.classify_batch((image, arrival))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def classify_batch(self, items: list[tuple[torch.Tensor, float]]) -> list[dict[str, Any]]:
        """Ray Serve's batch: the policy picks its depth from the arrival times; the time it took teaches it."""
        policy = self.classifier.policy
        start = time.perf_counter()
        decision = policy.decide([arrival for _, arrival in items])
        answers = self.classifier.classify([image for image, _ in items], decision.scaling_factor)
        policy.observe(decision.scaling_factor, len(items), (time.perf_counter() - start) * 1e3)
        return answers

    def stats(self) -> dict[str, Any]:
        """What this replica's policy chose (``handle.stats.remote()``)."""
        s = self.classifier.policy.stats()
        return {"decisions": s.decisions, "batches": s.batches, "requests": s.requests, "switches": s.switches}


def app(args: dict[str, str]) -> Any:
    """The application ``serve run adaptive_depth.serving.ray_serve:app key=value ...`` builds.

    Keys: ``model`` (required), ``slo_ms`` (50), ``scaling_factor`` / ``max_latency_ms`` (instead of adapting),
    ``max_batch_size`` (16), ``margin_ms`` (0), ``device`` (cpu), ``min_replicas`` (1), ``max_replicas`` (1),
    ``num_cpus`` (1 per replica).
    """
    if "model" not in args:
        raise ConfigError(f"serve run ...:app needs model=<saved adaptive-depth folder or Hub id>, got {args}")

    def number(key: str, default: float | None) -> float | None:
        return float(args[key]) if key in args else default

    spec = PolicySpec(
        slo_ms=number("slo_ms", 50.0),
        scaling_factor=number("scaling_factor", None),
        max_latency_ms=number("max_latency_ms", None),
        max_batch_size=int(args.get("max_batch_size", 16)),
        margin_ms=number("margin_ms", 0.0),
    )
    replicas = {"min_replicas": int(args.get("min_replicas", 1)), "max_replicas": int(args.get("max_replicas", 1))}
    deployment = AdaptiveDepthDeployment.options(
        # the replica must see a full batch's worth of requests at once for its batches to fill
        max_ongoing_requests=2 * spec.max_batch_size,
        autoscaling_config={**replicas, "target_ongoing_requests": spec.max_batch_size},
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
    )
    return deployment.bind(args["model"], spec, device=args.get("device", "cpu"))
