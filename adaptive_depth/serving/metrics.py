"""Prometheus metrics of a server whose HTTP front end and inference workers are separate processes.

prometheus_client's multiprocess mode: every process writes its metrics to files in one directory
(``PROMETHEUS_MULTIPROC_DIR``) and ``/metrics`` adds them up when scraped. :func:`enable_multiprocess` sets the
directory before the server starts its processes; :class:`HttpMetrics` lives in the HTTP process (what clients
see), :class:`WorkerMetrics` in each inference worker (what the depth policy chose).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from .controller import Decision

__all__ = ["HttpMetrics", "WorkerMetrics", "enable_multiprocess", "metrics_endpoint"]

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "adaptive_depth"


def enable_multiprocess() -> str:
    """Make every process started from now on (and this one) write its metrics to one directory; returns it.

    A directory already named by ``PROMETHEUS_MULTIPROC_DIR`` is used as it is; otherwise a temporary one is made
    and removed when this process exits.
    """
    path = os.environ.get(MULTIPROC_DIR)
    if not path:
        path = tempfile.mkdtemp(prefix="adaptive-depth-metrics-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ[MULTIPROC_DIR] = path
    from prometheus_client import values

    # prometheus_client picks in-memory or file-backed values when it is first imported; it may have been
    # imported before the directory was set, and the metrics made from here on must be file-backed.
    values.ValueClass = values.get_value_class()
    return path


def metrics_endpoint() -> Any:
    """A Starlette endpoint for ``GET /metrics``: every process's metrics, in Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    from starlette.responses import Response

    async def metrics(request: Any) -> Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _slo_buckets(slo_ms: float) -> list[float]:
    return [round(f * slo_ms / 1e3, 6) for f in (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0)]


class HttpMetrics:
    """What clients of the prediction endpoint see: requests by status, end-to-end latency, deadline misses.

    Args:
        slo_ms: the latency objective (an answer slower than it is a deadline miss; histogram buckets around it).
    """

    def __init__(self, slo_ms: float) -> None:
        from prometheus_client import Counter, Histogram

        self.slo_s = slo_ms / 1e3
        # registry=None: in multiprocess mode the collector reads the files; no in-process registry needed
        self.requests = Counter(f"{PREFIX}_requests", "Prediction requests by HTTP status", ["code"], registry=None)
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "End-to-end latency of answered prediction requests",
            buckets=_slo_buckets(slo_ms),
            registry=None,
        )
        self.misses = Counter(
            f"{PREFIX}_deadline_misses", "Answers (status 200) slower than the latency objective", registry=None
        )

    def record(self, status: int, seconds: float) -> None:
        """One request answered with ``status`` after ``seconds``."""
        self.requests.labels(code=str(status)).inc()
        if status == 200:
            self.latency.observe(seconds)
            if seconds > self.slo_s:
                self.misses.inc()


class WorkerMetrics:
    """What one inference worker chose: batches and images per depth, batch sizes, the depth now, decision time."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.batches = Counter(f"{PREFIX}_batches", "Batches served, by depth", ["scaling_factor"], registry=None)
        self.images = Counter(f"{PREFIX}_images", "Images answered, by depth", ["scaling_factor"], registry=None)
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Images per batch", buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=None
        )
        self.depth = Gauge(
            f"{PREFIX}_scaling_factor", "Depth of the last batch", multiprocess_mode="livemostrecent", registry=None
        )
        self.decide_seconds = Histogram(
            f"{PREFIX}_controller_seconds",
            "Time the depth policy took to decide a batch",
            buckets=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
            registry=None,
        )
        self.batch_seconds = Histogram(
            f"{PREFIX}_batch_seconds",
            "Time a batch took, from the decision to its answers (decoding, forward pass, encoding)",
            buckets=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0],
            registry=None,
        )

    def record(self, decision: Decision, images: int, decide_seconds: float, batch_seconds: float) -> None:
        """One batch served: the decision, the images answered, the time the decision and the batch took."""
        s = f"{decision.scaling_factor:g}"
        self.batches.labels(scaling_factor=s).inc()
        self.images.labels(scaling_factor=s).inc(images)
        self.batch_size.observe(images)
        self.depth.set(decision.scaling_factor)
        self.decide_seconds.observe(decide_seconds)
        self.batch_seconds.observe(batch_seconds)
