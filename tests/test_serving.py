"""The HTTP server end to end: examples/serve.py started on loopback, a bounded burst, bad requests, metrics."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from adaptive_depth import AdaptiveDepth

pytest.importorskip("litserve")  # the serve extra (in the test extra, so CI has it)

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "bird"]
MAX_BATCH = 4
SLO_BATCHES = 3  # the deadline: three full-depth batches of MAX_BATCH, as the profile measured them
BURST = 80  # 20 full-depth batches: far past the deadline on any CPU, so the depth has to drop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(size: tuple[int, int] = (40, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _json_image(data: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode()}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A saved 3-class model served by examples/serve.py on a free loopback port; the base URL."""
    folder = tmp_path_factory.mktemp("served") / "model"
    torch.manual_seed(0)
    # 128 px: a batch takes long enough that the model, not the test's client threads, is what the burst waits on
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=3), input_size=[3, 128, 128]).eval()
    model.set_labels(LABELS)
    torch.set_num_threads(1)  # the worker runs with --threads 1: a profile of this process is of its device
    model.profile(batch_size=[1, 2, MAX_BATCH], warmup=1, repeats=3)
    # relative to this machine's speed: a fixed deadline that a slow CPU misses when idle, a fast one never
    slo_ms = SLO_BATCHES * model.latency_profile.estimate(1.0, MAX_BATCH)
    model.save_pretrained(folder)
    port = _free_port()
    command = [sys.executable, str(ROOT / "examples" / "serve.py"), str(folder), "--port", str(port),
               "--slo-ms", f"{slo_ms:.1f}", "--max-batch-size", str(MAX_BATCH), "--threads", "1", "--device", "cpu",
               "--max-pixels", "1000000", "--max-body-mb", "1"]  # fmt: skip
    log = (folder.parent / "server.log").open("w")
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("metrics"))}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, (folder.parent / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not become healthy in 90 s:\n" + (folder.parent / "server.log").read_text())
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server, its HTTP and worker processes: one session
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def test_a_burst_is_answered_with_class_names_and_the_depth_drops_under_it(server: str) -> None:
    image = _png()
    # idle: one request at a time gets the full network
    idle = [_post(f"{server}/predict", _json_image(image), "application/json") for _ in range(3)]
    assert [status for status, _ in idle] == [200] * 3
    assert all(answer["label"] in LABELS and answer["scaling_factor"] == 1.0 for _, answer in idle), idle
    # a burst of concurrent requests, half as multipart uploads: the queue outgrows the slack of full depth
    boundary = "adaptive-depth-test"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    bodies = [
        (_json_image(image), "application/json") if i % 2 else (form, f"multipart/form-data; boundary={boundary}")
        for i in range(BURST)
    ]
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        answers = list(pool.map(lambda b: _post(f"{server}/predict", *b), bodies))
    assert [status for status, _ in answers] == [200] * BURST, [a for a in answers if a[0] != 200][:3]
    depths = [answer["scaling_factor"] for _, answer in answers]
    assert {answer["label"] for _, answer in answers} == {idle[0][1]["label"]}  # the same image, the same class
    assert set(depths) <= {0.25, 0.5, 0.75, 1.0} and min(depths) < 1.0, depths
    metrics = urllib.request.urlopen(f"{server}/metrics", timeout=10).read().decode()
    assert f'adaptive_depth_requests_total{{code="200"}} {BURST + 3}.0' in metrics
    assert f'adaptive_depth_images_total{{scaling_factor="{min(depths):g}"}}' in metrics
    assert "adaptive_depth_request_latency_seconds_bucket" in metrics and "adaptive_depth_deadline_misses" in metrics


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"hello", "text/plain", 415, "content type 'text/plain' is not accepted"),
        (b"not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "the request body is a list"),
        (b'{"picture": "x"}', "application/json", 400, "no 'image' field"),
        (b'{"image": "%%%"}', "application/json", 400, "not valid base64"),
        (_json_image(b"GIF89a but not really"), "application/json", 400, "the image cannot be read"),
        (_json_image(_png((2000, 1000), (0, 0, 0))), "application/json", 413, "2000x1000 = 2000000 pixels"),
        (b"{" + b" " * 1_100_000 + b"}", "application/json", 413, "larger than this server's limit"),
    ],
)
def test_a_bad_request_gets_a_4xx_with_the_reason_and_the_server_goes_on(
    server: str, body: bytes, content_type: str, status: int, reason: str
) -> None:
    got, answer = _post(f"{server}/predict", body, content_type)
    assert got == status and reason in answer["detail"], answer
    assert _post(f"{server}/predict", _json_image(_png()), "application/json")[0] == 200
    assert urllib.request.urlopen(f"{server}/health", timeout=5).status == 200


def test_a_worker_shows_its_policy_the_backlog_behind_the_batch() -> None:
    """The loop takes more than one batch from LitServe's queue (up to a bound), so the policy decides from the
    whole backlog; batches are served oldest first, and LitServe's stop signal ends the loop once the requests it
    holds are answered."""
    from queue import Queue
    from types import SimpleNamespace

    from adaptive_depth.serving import Decision
    from adaptive_depth.serving.server import _SENTINEL, LOOKAHEAD_BATCHES, DepthControlledLoop

    seen, served = [], []

    class Recorder:
        def decide(self, arrivals: list[float]) -> Decision:
            seen.append(list(arrivals))
            return Decision(1.0, min(len(arrivals), MAX_BATCH), 1.0, 10.0)

        def observe(self, *args) -> None:
            pass

    n = (LOOKAHEAD_BATCHES + 2) * MAX_BATCH  # more than the bound
    requests: Queue = Queue()
    for i in range(n):
        requests.put((f"uid{i}", 0, 100.0 + i, b"{}"))
    requests.put(_SENTINEL)
    api = SimpleNamespace(max_batch_size=MAX_BATCH, request_timeout=None, policy=Recorder(),
                          metrics=SimpleNamespace(record=lambda *args: None))  # fmt: skip
    loop = DepthControlledLoop()
    loop._serve = lambda lit_api, batch, s, transport, callbacks: served.append([b[2] for b in batch]) or len(batch)
    loop(api, "cpu", 0, requests, None, {}, None)
    assert len(seen[0]) == LOOKAHEAD_BATCHES * MAX_BATCH  # the first decision saw the backlog, up to the bound
    assert seen[0] == [100.0 + i for i in range(LOOKAHEAD_BATCHES * MAX_BATCH)]
    assert [t for batch in served for t in batch] == [100.0 + i for i in range(n)]  # every one, oldest first
