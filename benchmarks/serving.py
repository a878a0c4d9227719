"""Serving benchmark: the depth controller against fixed depths, under the same open-loop load, on one server.

For one model, in one run: the capacity of the server at s = 1 (requests per second, closed loop, saturated), then
for each depth policy (fixed s = 1, fixed smallest s, the static ``set_budget`` choice, the adaptive controller)
the same server (examples/serve.py, the same batching, model, profile and port) under three seeded traces of
Poisson arrivals on 127.0.0.1: ``light`` (half the capacity), ``ramp`` (half to twice the capacity and back) and
``burst`` (half the capacity with a burst of four times it). Per policy and trace: SLO attainment, goodput,
p50 / p95 / p99 latency, late and dropped requests, effective accuracy (the served model's accuracy at the depth
of each answer on its evaluation images, from its training report; late and dropped answers count as wrong), the
share of batches at s = 1 and the controller's time per batch against the batch's. Tables, JSON and a plot of
load, latency and depth over time (benchmarks/serving_report.py).

    python benchmarks/serving.py --model out/finetune --slo-ms 50                    # the README's main job
    python benchmarks/serving.py --model resnet50 --random-init --image-size 224 --slo-ms 1500 --threads 2

Every loop is bounded: a trace sends at most ``--max-requests`` requests and stops waiting ``--timeout-s`` after
its last arrival; a server that is not healthy within three minutes is an error. Needs the bench extra
(``pip install -e '.[bench]'``: aiohttp for the load).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from PIL import Image

from adaptive_depth import AdaptiveDepth, BudgetError
from adaptive_depth.budget import describe_device
from adaptive_depth.report import TrainingReport
from adaptive_depth.serving.classifier import profile_batch_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when imported by path in tests
from serving_report import markdown, plot, summarise

ROOT = Path(__file__).resolve().parents[1]
TRACES = ("light", "ramp", "burst")
POLICIES = ("full", "smallest", "set_budget", "adaptive")  # fixed s = 1, fixed smallest s, static choice, controller


@dataclass
class Sent:
    """One request of a trace: when it was due (s from the trace start), how it went."""

    due: float
    latency: float | None = None  # seconds, None if it got no answer
    status: int = 0  # HTTP status, 0 for no answer (timeout, refused connection)
    depth: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/finetune", help="a saved adaptive model, or a timm name with --random-init")
    p.add_argument("--random-init", action="store_true", help="wrap --model (a timm name) with random weights")
    p.add_argument("--image-size", type=int, default=224, help="input size with --random-init")
    p.add_argument("--slo-ms", type=float, default=50.0, help="latency objective of every request")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--margin-ms", type=float, help="time kept from every deadline (default: a tenth of the SLO)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of the ramp (the others: half of it)")
    p.add_argument("--calibration-s", type=float, default=8.0, help="seconds of the capacity measurement")
    p.add_argument("--max-requests", type=int, default=20000, help="the most requests one trace may send")
    p.add_argument("--timeout-s", type=float, default=10.0, help="a request unanswered after this is dropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
        help="the depth policies to compare, in the order each trace visits them (the capacity is always measured "
        "at s = 1)",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=int, default=1,
        help="run the traces this many times, the policies' order rotated by one each time (so each policy meets "
        "the traces after a different one); the table shows the mean and range over repeats",
    )  # fmt: skip
    p.add_argument("--tag", help="name of the outputs (default: from the model)")
    p.add_argument("--output-dir", type=Path, default=Path("out/serving-bench"), help="JSON results")
    p.add_argument("--plot-dir", type=Path, default=ROOT / "docs" / "img")
    args = p.parse_args(argv)
    if args.margin_ms is None:
        args.margin_ms = args.slo_ms / 10
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


# ---------------------------------------------------------------------------------------------------- the model
def prepare_model(args: argparse.Namespace, folder: Path) -> tuple[AdaptiveDepth, dict[float, float] | None]:
    """The model to serve, saved into ``folder`` with a profile of this machine at the server's batch sizes.

    The profile is measured here, with the worker's thread count, so that every server start reuses it. Returns
    the model and its top-1 accuracy per depth on its evaluation images (from its training report), if it has one.
    """
    torch.set_num_threads(args.threads)
    if args.random_init:
        size = [3, args.image_size, args.image_size]
        model = AdaptiveDepth.from_pretrained(args.model, pretrained=False, input_size=size)
    else:
        model = AdaptiveDepth.from_pretrained(args.model)
    model.eval().profile(batch_size=profile_batch_sizes(args.max_batch_size), warmup=2, repeats=5)
    model.save_pretrained(folder)
    training = model.config.extra.get("training")
    if not training:
        return model, None
    report = TrainingReport.from_dict(training)
    return model, {r.scaling_factor: r.top1 for r in report.results if r.player == report.deployed}


def payloads(model: AdaptiveDepth, count: int = 32) -> list[bytes]:
    """JSON bodies of random PNG images of the model's input size (the costs do not depend on the pixels)."""
    _, h, w = model.config.input_size
    rng = random.Random(0)
    bodies = []
    for _ in range(count):
        image = Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        bodies.append(json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()}).encode())
    return bodies


# ---------------------------------------------------------------------------------------------------- the server
@contextmanager
def server(folder: Path, args: argparse.Namespace, policy: list[str]) -> Iterator[str]:
    """examples/serve.py on a free loopback port with ``policy``'s flags; yields its URL, stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="serving-bench-metrics-")
    command = [sys.executable, str(ROOT / "examples" / "serve.py"), str(folder), "--port", str(port),
               "--slo-ms", str(args.slo_ms), "--max-batch-size", str(args.max_batch_size),
               "--threads", str(args.threads), "--device", "cpu", "--margin-ms", str(args.margin_ms),
               "--request-timeout-s", str(args.timeout_s), *policy]  # fmt: skip
    log = open(Path(metrics_dir) / "server.log", "w")  # noqa: SIM115 (closed below, after the process)
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": metrics_dir, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{(Path(metrics_dir) / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus counters: ``{"name{labels}": value}`` of the sample lines."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(adaptive_depth_\S+)\s+(\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def settle(url: str, every_s: float, limit_s: float = 90.0) -> dict[str, float]:
    """Wait (at most ``limit_s``) until the server has finished its backlog; its metrics then.

    Requests whose client gave up are still in the server's queue until served or expired (``--timeout-s``);
    the next trace must not share the machine with them. Finished: no answer in ``every_s`` (more than a batch).
    """
    deadline, last = time.monotonic() + limit_s, None
    while True:
        metrics = scrape(url)
        done = sum(v for k, v in metrics.items() if k.startswith("adaptive_depth_requests_total"))
        served = sum(v for k, v in metrics.items() if k.startswith("adaptive_depth_images_total"))
        if (done, served) == last or time.monotonic() > deadline:
            return metrics
        last = (done, served)
        time.sleep(every_s)


# ---------------------------------------------------------------------------------------------------- the load
def rate_of(trace: str, capacity: float, duration: float) -> Callable[[float], float]:
    """Requests per second at time ``t`` of a trace."""
    if trace == "light":
        return lambda t: 0.5 * capacity
    if trace == "ramp":  # half to twice the capacity at mid-trace, and back
        return lambda t: capacity * (0.5 + 1.5 * (1 - abs(2 * t / duration - 1)))
    if trace == "burst":  # a tenth of the trace at four times the capacity, after 40% of it
        return lambda t: capacity * (4.0 if 0.4 * duration <= t < 0.5 * duration else 0.5)
    raise ValueError(trace)


def arrivals(rate: Callable[[float], float], peak: float, duration: float, seed: int, limit: int) -> list[float]:
    """Poisson arrival times of a rate that changes over time (thinning a process at the peak rate), seeded."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < limit:
        t += rng.expovariate(peak)
        if t >= duration:
            break
        if rng.random() < rate(t) / peak:
            times.append(t)
    return times


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, sent: Sent, start: float) -> None:
    try:
        async with session.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"}) as r:
            answer = await r.json(content_type=None)
            sent.status = r.status
            sent.latency = time.perf_counter() - start
            sent.depth = answer.get("scaling_factor") if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        sent.status = 0


async def run_trace(url: str, due: list[float], bodies: list[bytes], timeout_s: float) -> list[Sent]:
    """Open loop: every request leaves at its time, whatever the answers to the earlier ones."""
    sent = [Sent(t) for t in due]
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side queue: the server's queue is what is measured
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        zero, tasks = time.perf_counter(), []
        for i, s in enumerate(sent):
            delay = zero + s.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(session, url, bodies[i % len(bodies)], s, time.perf_counter())))
        await asyncio.wait(tasks, timeout=timeout_s + 5)  # every request has its own timeout too
    return sent


async def saturate(url: str, bodies: list[bytes], concurrency: int, seconds: float, limit: int) -> float:
    """Closed loop: ``concurrency`` clients send back to back for ``seconds``; answers per second."""
    done, stop = [0], time.perf_counter() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop and done[0] < limit:
                s = Sent(0.0)
                await _post(session, url, bodies[i % len(bodies)], s, time.perf_counter())
                done[0] += s.status == 200
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
    return done[0] / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- the run
def rotated(names: list[str], repeat: int) -> list[str]:
    """The order in which the servers meet a trace in repeat ``repeat``: the policies' order rotated by it."""
    k = repeat % len(names)
    return names[k:] + names[:k]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tag = args.tag or Path(args.model).name
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    try:
        model, accuracy = prepare_model(args, work / "model")
        profile = model.latency_profile
        bodies = payloads(model)
        depths = model.config.scaling_factors
        budget_ms = args.slo_ms / 2  # a full batch within half the SLO: a request may wait for the batch before
        quiet_s = max(1.0, 2e-3 * max(ms for row in profile.latency_ms.values() for ms in row.values()))
        every = {
            "full": ("s=1", ["--scaling-factor", "1"]),
            "smallest": (f"s={depths[0]:g}", ["--scaling-factor", str(depths[0])]),
            "set_budget": ("set_budget", ["--max-latency-ms", str(budget_ms)]),
            "adaptive": ("adaptive", []),
        }
        policies = dict(every[key] for key in args.policies)
        if "set_budget" in policies:
            try:
                chosen = model.set_budget(max_latency_ms=budget_ms, batch_size=args.max_batch_size)
                print(f"set_budget(max_latency_ms={budget_ms:g}, batch_size={args.max_batch_size}) -> s = {chosen:g}")
            except BudgetError as e:
                print(f"no static set_budget policy: {e}")
                del policies["set_budget"]
        print(f"serving benchmark: {tag} on {describe_device('cpu')}, SLO {args.slo_ms:g} ms", flush=True)
        results = []
        with ExitStack() as servers:
            # every policy's server is up at once (idle ones cost nothing) and the traces take turns across them,
            # so a slow spell of the shared machine does not fall on one policy alone
            urls = {
                name: servers.enter_context(server(work / "model", args, flags)) for name, flags in policies.items()
            }
            full = urls.get("s=1") or servers.enter_context(server(work / "model", args, every["full"][1]))
            calibrate = [full, bodies, 2 * args.max_batch_size]
            asyncio.run(saturate(*calibrate, 2.0, args.max_requests))  # warm-up
            capacity = asyncio.run(saturate(*calibrate, args.calibration_s, args.max_requests))
            print(f"capacity at s = 1: {capacity:.1f} requests/s", flush=True)
            durations = {"light": args.duration / 2, "ramp": args.duration, "burst": args.duration / 2}
            for repeat in range(args.repeats):
                for i, trace in enumerate(TRACES):
                    rate = rate_of(trace, capacity, durations[trace])
                    due = arrivals(rate, 4 * capacity, durations[trace], args.seed + i, args.max_requests)
                    for position, name in enumerate(rotated(list(urls), repeat)):
                        url = urls[name]
                        before = settle(url, quiet_s)
                        sent = asyncio.run(run_trace(url, due, bodies, args.timeout_s))
                        after = settle(url, quiet_s)
                        row = summarise(name, trace, sent, durations[trace], args.slo_ms, accuracy, before, after)
                        row["summary"] |= {"repeat": repeat, "position": position}
                        results.append(row)
                        print(json.dumps(row["summary"]), flush=True)
        data = {
            "model": tag,
            "device": describe_device("cpu"),
            "slo_ms": args.slo_ms,
            "capacity_rps": capacity,
            "max_batch_size": args.max_batch_size,
            "margin_ms": args.margin_ms,
            "threads": args.threads,
            "set_budget_ms": budget_ms,
            "accuracy": accuracy,
            "profile": profile.to_dict() if profile is not None else None,
            "durations": durations,
            "repeats": args.repeats,
            "results": results,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(data))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    picture = plot(data, args.plot_dir / f"serving-{tag}.png")
    print(f"\nplot: {picture}; results: {args.output_dir / f'{tag}.json'}")
    return data


if __name__ == "__main__":
    main()
