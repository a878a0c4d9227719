"""Serve a depth-switchable image classifier over HTTP, the depth of each batch chosen under load.

    python examples/serve.py out/finetune --slo-ms 50                # the model saved by finetune.py
    curl -F image=@digit.png http://127.0.0.1:8000/predict     # {"label": "3", "score": ..., "scaling_factor": 1.0}
    curl http://127.0.0.1:8000/metrics                               # Prometheus text: requests, latency, depth
    python examples/serve.py me/resnet50-adaptive --slo-ms 200 --scaling-factor 0.5   # one fixed depth instead

Before each batch the server runs the largest trained depth whose predicted latency still meets the oldest waiting
request's deadline (arrival + --slo-ms): the full network while the load allows, smaller depths when requests
queue up (docs/serving.md). LitServe does the HTTP and the batching; the model's own preprocessing and class names
come with it. Needs the serve extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import argparse
import logging
import sys

from adaptive_depth import AdaptiveDepthError
from adaptive_depth.serving import PolicySpec
from adaptive_depth.serving.requests import DEFAULT_MAX_PIXELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a model, the latency objective, how the depth is chosen, the server's limits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved adaptive-depth model: local folder or Hub id")
    p.add_argument("--slo-ms", type=float, default=50.0, help="latency objective of every request (default: 50)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--scaling-factor", type=float, help="serve every batch at this depth instead of adapting")
    depth.add_argument(
        "--max-latency-ms", type=float, help="serve at the depth set_budget() picks: a full batch within this budget"
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="the most requests in one batch (default: 16)")
    p.add_argument("--margin-ms", type=float, default=0.0, help="time kept from every deadline for the way back")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"], help="default: loopback")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="LitServe accelerator")
    p.add_argument("--workers", type=int, default=1, help="worker processes per device, each with its own model")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    p.add_argument("--profile", action="store_true", help="measure the latency profile at start even if one fits")
    p.add_argument("--top-k", type=int, default=1, help="classes per answer")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted (w x h)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body accepted")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="a request waiting longer gets a 504")
    args = p.parse_args(argv)
    for name in ("max_batch_size", "workers", "top_k", "max_pixels", "port"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adaptive_depth.serving.server import serve  # needs the serve extra

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = PolicySpec(
        slo_ms=args.slo_ms,
        scaling_factor=args.scaling_factor,
        max_latency_ms=args.max_latency_ms,
        max_batch_size=args.max_batch_size,
        margin_ms=args.margin_ms,
    )
    serve(
        args.model,
        spec,
        host=args.host,
        port=args.port,
        accelerator=args.device,
        workers_per_device=args.workers,
        max_payload_bytes=int(args.max_body_mb * 1e6),
        timeout=args.request_timeout_s,
        top_k=args.top_k,
        max_pixels=args.max_pixels,
        threads=args.threads,
        refresh_profile=args.profile,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdaptiveDepthError as e:  # bad input: one clear line, no traceback
        sys.exit(f"error: {e}")
