"""An HTTP server for a depth-switchable image classifier, on LitServe, with the depth chosen per batch.

LitServe runs the HTTP front end (FastAPI, uvicorn) and one inference worker process per model copy; requests
reach the workers through its queue. :class:`DepthControlledLoop` is the worker's loop: it keeps the waiting
requests with their arrival times, asks the worker's depth policy how many to batch and at which depth, and runs
the LitAPI hooks (``decode_request`` per request, so a bad one gets its own 4xx and the rest of its batch is
served). ``/health`` is LitServe's; ``/metrics`` serves Prometheus text.

Needs the ``serve`` extra: ``pip install adaptive-depth[serve]``.
"""

# No ``from __future__ import annotations`` here: LitServe and FastAPI read the hooks' annotations at run time.

import json
import logging
import time
from collections import deque
from queue import Empty
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request
from litserve.callbacks import EventTypes
from litserve.loops import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from ..config import AdaptiveDepthConfig
from ..errors import ConfigError
from ..sources import HubOptions, resolve
from .classifier import ImageClassifier, PolicySpec
from .metrics import HttpMetrics, WorkerMetrics, enable_multiprocess, metrics_endpoint
from .requests import DEFAULT_MAX_PIXELS, BadRequestError

__all__ = ["AdaptiveDepthAPI", "DepthControlledLoop", "PredictionGuard", "build_server", "serve"]

logger = logging.getLogger(__name__)

CONTENT_TYPES = ("application/json", "multipart/form-data")
DISCARD_BYTES = 1_000_000  # read and dropped past the body limit, so a client still sending gets its 413
_SENTINEL = (None, None, None, None)  # what LitServe puts in the queue to stop a worker
LOOKAHEAD_BATCHES = 16  # how much of the backlog a worker holds and its policy sees, in largest batches


class AdaptiveDepthAPI(ls.LitAPI):
    """The LitAPI of one worker: its model loaded once in :meth:`setup`, requests decoded one by one, each batch
    classified at the depth the loop was given by the policy.

    Args:
        model_id: a saved adaptive-depth model: local folder or Hub id.
        spec: how the depth is chosen (adaptive, fixed, static budget), the SLO, the largest batch.
        top_k: classes per answer.
        max_pixels: the largest image accepted.
        threads: torch threads of the worker (default: torch's).
        refresh_profile: measure the latency profile at start even if a fitting one was saved.
        api_path: the prediction endpoint.
    """

    def __init__(
        self,
        model_id: str,
        spec: PolicySpec,
        *,
        top_k: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        refresh_profile: bool = False,
        api_path: str = "/predict",
    ) -> None:
        super().__init__(
            max_batch_size=spec.max_batch_size, batch_timeout=0.0, api_path=api_path, loop=DepthControlledLoop()
        )
        self.model_id, self.policy_spec, self.top_k, self.max_pixels = model_id, spec, top_k, max_pixels
        self.threads, self.refresh_profile = threads, refresh_profile

    def setup(self, device: str) -> None:
        """Load the model once for this worker, measure its latency here if needed, build the depth policy."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.classifier = ImageClassifier.load(
            self.model_id,
            self.policy_spec,
            device=device,
            refresh_profile=self.refresh_profile,
            top_k=self.top_k,
            max_pixels=self.max_pixels,
        )
        self.policy = self.classifier.policy
        self.metrics = WorkerMetrics()
        logger.info("serving %s on %s, policy %s", self.model_id, device, self.policy_spec.name)

    def decode_request(self, request: Request) -> torch.Tensor:
        """One request body (JSON or multipart form) to the model's input, or a 4xx with the reason."""
        try:
            return self.classifier.preprocess(request)
        except BadRequestError as e:
            raise HTTPException(e.status_code, e.reason) from e

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor, context: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Classify the batch at the depth the loop decided (the same for every request of the batch)."""
        return self.classifier.classify(x, context[0]["scaling_factor"])

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The answer as JSON: ``label``, ``score``, ``top_k`` and the ``scaling_factor`` that produced it."""
        return output


class DepthControlledLoop(LitLoop):
    """A LitServe worker loop whose batch size and depth come from the worker's depth policy.

    Requests are taken from LitServe's queue (up to ``LOOKAHEAD_BATCHES`` of the largest batch) and kept with their
    arrival times; before each batch the policy decides from those times (the backlog behind the batch included),
    the oldest requests are served, and the time the batch took (decoding to encoded answers) is reported back to
    the policy. Nothing waits to fill a batch: a worker that is free serves what is there. Told to stop, it answers
    the requests it holds first.
    """

    def __call__(
        self,
        lit_api: "AdaptiveDepthAPI",
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: dict[str, str],
        callback_runner: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        waiting: deque[tuple[Any, str, float, Any]] = deque()
        stopping = False  # told to stop: the requests already taken are still answered
        while True:
            if not stopping:
                stopping = not self._collect(waiting, request_queue, LOOKAHEAD_BATCHES * lit_api.max_batch_size)
            self._expire(waiting, lit_api, transport)
            if not waiting:
                if stopping:
                    return
                continue
            start = time.perf_counter()
            decision = lit_api.policy.decide([item[2] for item in waiting])
            decide_seconds = time.perf_counter() - start
            batch = [waiting.popleft() for _ in range(decision.batch_size)]
            served = self._serve(lit_api, batch, decision.scaling_factor, transport, callback_runner)
            if served:
                elapsed = time.perf_counter() - start
                lit_api.policy.observe(decision.scaling_factor, served, elapsed * 1e3)
                lit_api.metrics.record(decision, served, decide_seconds, elapsed)

    def _collect(self, waiting: deque, request_queue: Any, limit: int) -> bool:
        """Move requests from LitServe's queue to ``waiting`` (blocking for one if none waits); False: stop."""
        while len(waiting) < limit:
            try:
                item = request_queue.get(timeout=1.0) if not waiting else request_queue.get_nowait()
            except Empty:
                return True
            if item == _SENTINEL:
                return False
            waiting.append(item)
        return True

    def _expire(self, waiting: deque, lit_api: "AdaptiveDepthAPI", transport: Any) -> None:
        """Answer 504 to requests that waited longer than the server's timeout (``LitServer(timeout=...)``)."""
        timeout = lit_api.request_timeout
        if not timeout or timeout == -1:
            return
        now = time.monotonic()
        for item in [i for i in waiting if now - i[2] > timeout]:
            waiting.remove(item)
            self._reply_error(transport, item, HTTPException(504, f"the request waited more than {timeout} s"))

    def _serve(
        self, lit_api: "AdaptiveDepthAPI", batch: list, scaling_factor: float, transport: Any, callbacks: Any
    ) -> int:
        """Decode, classify and answer one batch; returns how many requests were classified."""
        inputs, good = [], []
        callbacks.trigger_event(EventTypes.BEFORE_DECODE_REQUEST.value, lit_api=lit_api)
        for item in batch:
            try:
                inputs.append(lit_api.decode_request(item[3]))
                good.append(item)
            except HTTPException as e:
                self._reply_error(transport, item, e)
            except Exception as e:  # a bug, not the client's fault: a 500 for this request, the server goes on
                logger.exception("decoding a request failed")
                self.put_error_response(transport, item[0], item[1], e, LoopResponseType.REGULAR)
        callbacks.trigger_event(EventTypes.AFTER_DECODE_REQUEST.value, lit_api=lit_api)
        if not inputs:
            return 0
        try:
            callbacks.trigger_event(EventTypes.BEFORE_PREDICT.value, lit_api=lit_api)
            outputs = lit_api.unbatch(
                lit_api.predict(lit_api.batch(inputs), context=[{"scaling_factor": scaling_factor}] * len(inputs))
            )
            callbacks.trigger_event(EventTypes.AFTER_PREDICT.value, lit_api=lit_api)
            answers = [lit_api.encode_response(output) for output in outputs]
        except Exception as e:
            logger.exception("a batch of %d failed at s=%g", len(inputs), scaling_factor)
            for item in good:
                self.put_error_response(transport, item[0], item[1], e, LoopResponseType.REGULAR)
            return 0
        for item, answer in zip(good, answers):
            self.put_response(transport, item[0], item[1], answer, LitAPIStatus.OK, LoopResponseType.REGULAR)
        return len(good)

    def _reply_error(self, transport: Any, item: tuple, error: HTTPException) -> None:
        self.put_response(
            transport,
            item[0],
            item[1],
            PickleableHTTPException.from_exception(error),
            LitAPIStatus.ERROR,
            LoopResponseType.REGULAR,
        )


class PredictionGuard:
    """ASGI middleware in front of the prediction endpoint: refuses a wrong content type (415), a body larger
    than ``max_bytes`` (413) or a JSON body that does not parse (400) before the framework sees it, and records
    every answer in the HTTP metrics.

    Args:
        app: the wrapped ASGI app.
        path: the prediction endpoint.
        max_bytes: the largest request body accepted.
        slo_ms: the latency objective (for the deadline-miss counter).
    """

    def __init__(self, app: Any, *, path: str, max_bytes: int, slo_ms: float) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes
        self.metrics = HttpMetrics(slo_ms)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get(b"content-type", "").split(";")[0].strip().lower()
        body, problem = await self._read(receive, headers.get(b"content-length", ""))
        if content_type not in CONTENT_TYPES:
            problem = (
                415,
                f"content type {content_type or 'none'!r} is not accepted: send application/json "
                '({"image": "<base64 image bytes>"}) or multipart/form-data (an "image" file)',
            )
        elif problem is None and content_type == "application/json":
            try:
                json.loads(body)
            except ValueError as e:
                problem = (400, f'the body is not valid JSON ({e}): send {{"image": "<base64 image bytes>"}}')
        if problem is not None:
            await _reject(send_status, *problem)
        else:
            await self.app(scope, _replay(body, receive), send_status)
        self.metrics.record(status[0], time.perf_counter() - start)

    async def _read(self, receive: Any, length: str) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body, or the 413 to answer when it is larger than ``max_bytes``.

        A body up to ``DISCARD_BYTES`` over the limit is read to its end (and dropped) so that the client, still
        sending, gets the answer; a larger one is answered at once and the connection closes, as HTTP servers do.
        """
        too_large = (413, f"the body is larger than this server's limit of {self.max_bytes} bytes")
        if length.isdigit() and int(length) > self.max_bytes + DISCARD_BYTES:
            return b"", too_large
        chunks, size, more = [], 0, True
        while more and size <= self.max_bytes + DISCARD_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return (b"", too_large) if size > self.max_bytes else (b"".join(chunks), None)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that gives the body already read, then passes on what the connection says next."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()  # after the whole body the connection only reports a disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reject(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_server(
    model_id: str,
    spec: PolicySpec,
    *,
    workers_per_device: int = 1,
    accelerator: str = "auto",
    max_payload_bytes: int = 20_000_000,
    timeout: float = 30.0,
    **api_kwargs: Any,
) -> ls.LitServer:
    """A LitServer for ``model_id`` (not started: call ``.run(host=..., port=...)``).

    Args:
        model_id: a saved adaptive-depth model: local folder or Hub id.
        spec: the depth policy, SLO and largest batch.
        workers_per_device: inference worker processes per device, each with its own model and policy.
        accelerator: ``"cpu"``, ``"cuda"``, ... (LitServe's; ``"auto"`` picks a GPU when there is one).
        max_payload_bytes: the largest request body accepted.
        timeout: seconds a request may wait for a worker before a 504.
        **api_kwargs: :class:`AdaptiveDepthAPI`'s other arguments.
    """
    # Checked here, before any worker starts: a worker that cannot load its model only logs it and stops.
    resolved = resolve(model_id, HubOptions())
    if resolved.kind != "adaptive":
        raise ConfigError(
            f"{model_id!r} is a base model, not a saved adaptive-depth model: wrap and save it first "
            "(AdaptiveDepth.from_pretrained(name).save_pretrained(folder); examples/finetune.py trains one)"
        )
    spec.check_depths(AdaptiveDepthConfig.from_dict(resolved.config or {}).scaling_factors)
    enable_multiprocess()
    api = AdaptiveDepthAPI(model_id, spec, **api_kwargs)
    guard = {"path": api.api_path, "max_bytes": max_payload_bytes, "slo_ms": spec.slo_ms}
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        workers_per_device=workers_per_device,
        timeout=timeout,
        middlewares=[(PredictionGuard, guard)],  # the body limit too: LitServer's own answers 500 when it trips
    )
    server.app.add_route("/metrics", metrics_endpoint(), methods=["GET"])
    return server


def serve(model_id: str, spec: PolicySpec, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Build the server (:func:`build_server`) and run it until interrupted, on ``host:port``."""
    build_server(model_id, spec, **kwargs).run(host=host, port=port, generate_client_file=False, num_api_servers=1)
