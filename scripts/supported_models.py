"""Walk timm's and transformers' model lists and record what adaptive-depth's discovery finds.

    python scripts/supported_models.py --only all --workers 1           # the full walk, writes docs/
    python scripts/supported_models.py --only timm --filter 'resnet*' --limit 10 --out /tmp/x.md

Every architecture is built with random weights (nothing is downloaded) and probed once by ``discover`` at its
declared input size, batch 1, on CPU. Parameters are first counted on the meta device; models above
``--max-params-m`` are skipped. Transformers configs are narrowed (widths divided by 4, depths kept) when that
builds and runs; otherwise the default config is used. Each model runs in a worker process that is killed after
``--timeout`` seconds and recycled every few models, so one hanging or huge model cannot stop the walk.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import gc
import json
import multiprocessing as mp
import re
import shlex
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as HF_NAMES

from adaptive_depth.config import GATE_LABELS
from adaptive_depth.discovery import discover
from adaptive_depth.errors import ConfigError, NoGateableBlocksError
from adaptive_depth.flops import count_flops_by_module
from adaptive_depth.policy import active_mask, keep_count

RECYCLE_EVERY = 25  # models per worker process before it is replaced (bounds leaked memory)
STATUSES = ("wraps", "refused", "error", "skipped", "timeout")
COUNTS = ("gates", "stages", "blocks", "gateable", "kept_at_half", "flops_at_half")  # the columns of a 'wraps' row
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "embed_dim", "hidden_sizes", "embed_dims")


def _timm_build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    """A timm architecture with random weights, its input size (C, H, W) and a config note."""
    model = timm.create_model(name, pretrained=False)
    return model, tuple(timm.data.resolve_model_data_config(model)["input_size"]), "default"


def _hf_build(model_type: str, narrow: bool) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    """A transformers image classifier with random weights, optionally with widths divided by 4 (depth kept).

    Composite configs (CLIP, SigLIP) are narrowed, and give the input size, through their ``vision_config``.
    The mapping names several classes for some model types (DeiT, LeViT, Perceiver); the first is used.
    """
    config = transformers.AutoConfig.for_model(model_type)
    vision = getattr(config, "vision_config", None) or config
    note = "default"
    for cfg, field in ((c, f) for c in {id(config): config, id(vision): vision}.values() for f in WIDTH_FIELDS):
        value = getattr(cfg, field, None)
        if narrow and isinstance(value, int) and value % 4 == 0:
            setattr(cfg, field, value // 4)
            note = "widths / 4"
        elif (
            narrow
            and isinstance(value, list | tuple)
            and value
            and all(isinstance(v, int) and not v % 4 for v in value)
        ):
            setattr(cfg, field, type(value)(v // 4 for v in value))
            note = "widths / 4"
    class_name = HF_NAMES[model_type]
    model = getattr(transformers, class_name if isinstance(class_name, str) else class_name[0])(config)
    size = getattr(vision, "image_size", None) or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return model, (int(getattr(vision, "num_channels", None) or 3), int(h), int(w)), note


def _short(e: BaseException) -> str:
    """A one-line description of an exception (the probe's own cause when discovery wraps one)."""
    if isinstance(e, ConfigError) and e.__cause__ is not None:
        return "probe forward failed: " + _short(e.__cause__)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}"


def _discover_row(model: torch.nn.Module, size: tuple[int, ...]) -> dict[str, Any]:
    """Run discovery on a built model; the fields of a 'wraps' row (raises what discovery raises).

    ``flops_at_half``: the FLOPs at s = 0.5 over those at s = 1 (``torch.utils.flop_counter``, batch 1): how much of
    the model the gates can really save (a partial wrap keeps most of them). One counted pass at full depth gives
    every module's FLOPs; those of the units s = 0.5 switches off are subtracted (a skipped unit costs nothing and
    leaves the shapes, hence the FLOPs, of everything else as they were; tests/test_supported_models.py checks the
    figure against a model run at s = 0.5).
    """
    x = torch.randn(1, *size)
    with torch.no_grad():
        found = discover(model, x)
    full, per_module = count_flops_by_module(model, x)
    root = type(model).__name__
    skipped = 0
    for stage in found.stages:
        mask = active_mask(stage.gateable, keep_count(0.5, stage.num_blocks, stage.num_fixed))
        skipped += sum(per_module.get(f"{root}.{b.name}", 0) for b, on in zip(stage.blocks, mask) if not on)
    return {
        "status": "wraps",
        "method": found.method,
        "gates": " + ".join(GATE_LABELS[kind] for kind in sorted({s.kind for s in found.stages})),
        "stages": len(found.stages),
        "blocks": sum(s.num_blocks for s in found.stages),
        "gateable": sum(s.num_blocks - s.num_fixed for s in found.stages),
        "kept_at_half": sum(keep_count(0.5, s.num_blocks, s.num_fixed) for s in found.stages),
        "flops_at_half": round((full - skipped) / full, 3) if full else "",
    }


def check(source: str, name: str, max_params_m: float) -> dict[str, Any]:
    """Build one model with random weights, run discovery on it and describe the outcome.

    Args:
        source: ``"timm"`` or ``"transformers"``.
        name: a timm architecture name or a transformers ``model_type``.
        max_params_m: models with more parameters (millions) are skipped, not built.

    Returns:
        A row: ``source``, ``name``, ``status`` (one of ``STATUSES``), ``params_m``, ``config``, ``input``,
        and either the discovery counts or a ``reason``.
    """
    row: dict[str, Any] = {"source": source, "name": name}
    attempts = (
        [lambda: _timm_build(name)] if source == "timm" else [lambda n=n: _hf_build(name, n) for n in (True, False)]
    )
    narrow_error = None  # why the narrowed transformers config failed, reported if the default one is too large
    for i, build in enumerate(attempts):
        last = i == len(attempts) - 1
        model = None
        try:
            try:
                with torch.device("meta"):
                    model, size, row["config"] = build()
                params = sum(p.numel() for p in model.parameters())
                model = None
            except Exception:  # some models cannot be built on meta: build for real and count after
                params = None
            if params is None or params / 1e6 <= max_params_m:
                model, size, row["config"] = build()
                params = sum(p.numel() for p in model.parameters())
            row["params_m"], row["input"] = round(params / 1e6, 1), "x".join(map(str, size))
            if params / 1e6 > max_params_m:
                row.update(status="skipped", reason=f"not checked: too large, {params / 1e6:.1f} M params")
                if narrow_error:
                    row.update(status="error", reason=f"{narrow_error} (narrowed; default config {row['reason'][13:]})")
            else:
                row.update(_discover_row(model, size))
            return row
        except NoGateableBlocksError as e:
            reason = re.split(r" \(|\. ", str(e).split("nothing to gate: ", 1)[-1])[0]
            return {**row, "status": "refused", "reason": f"nothing to gate: {reason}"}
        except Exception as e:  # a model this walk cannot build or run: record it (or retry wider), never stop
            if last:
                return {**row, "status": "error", "reason": _short(e)}
            narrow_error = _short(e)
        finally:
            del model
            gc.collect()
    raise AssertionError("unreachable")


def _worker(conn: Connection, max_params_m: float) -> None:
    """Worker process: answer ``(source, name)`` jobs with rows until told to stop (``None``)."""
    torch.set_num_threads(1)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        t0 = time.monotonic()
        conn.send({**check(*job, max_params_m), "seconds": round(time.monotonic() - t0, 1)})


def walk(jobs: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check every job in worker processes, killing one that runs past ``args.timeout``; rows in job order."""
    ctx, pending, rows = mp.get_context("spawn"), collections.deque(jobs), {}
    idle: list[dict[str, Any]] = []
    busy: dict[Connection, dict[str, Any]] = {}

    def start() -> dict[str, Any]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, args.max_params_m), daemon=True)
        proc.start()
        parent.recv()  # "ready": imports do not count against the first model's timeout
        return {"proc": proc, "conn": parent, "done": 0}

    def finish(w: dict[str, Any], row: dict[str, Any], alive: bool = True) -> None:
        rows[w["job"]] = row
        print(f"[{len(rows)}/{len(jobs)}] {row['source']} {row['name']}: {row['status']} {row.get('reason', '')}")
        sys.stdout.flush()
        if alive and w["done"] < RECYCLE_EVERY:
            idle.append(w)
        else:
            w["conn"].send(None) if alive else w["proc"].kill()
            w["proc"].join()
        if args.json and len(rows) % 25 == 0:  # partial results survive an interrupted walk
            args.json.write_text(json.dumps(list(rows.values()), indent=1))

    def failed(w: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
        return {"source": w["job"][0], "name": w["job"][1], "status": status, "reason": reason}

    while pending or busy:
        while pending and len(busy) < args.workers:
            w = idle.pop() if idle else start()
            w.update(job=pending.popleft(), t0=time.monotonic(), done=w["done"] + 1)
            w["conn"].send(w["job"])
            busy[w["conn"]] = w
        for conn in wait(list(busy), timeout=1.0):
            w = busy.pop(conn)
            try:
                finish(w, conn.recv())
            except EOFError:  # the worker died: out of memory, or a crash in native code
                w["proc"].join()
                finish(w, failed(w, "error", f"worker process died (exit code {w['proc'].exitcode})"), alive=False)
        for conn, w in list(busy.items()):
            if time.monotonic() - w["t0"] > args.timeout:
                del busy[conn]
                finish(w, failed(w, "timeout", f"over {args.timeout:g} s"), alive=False)
    for w in idle:
        w["conn"].send(None)
        w["proc"].join()
    return [rows[job] for job in jobs]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """The per-model markdown table of one source, sorted by name."""
    out = [
        "| model | params (M) | config | input | status | discovery | gates | stages | blocks | gateable "
        "| kept at s=0.5 | FLOPs at s=0.5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["name"]):
        status = r["status"] if r["status"] == "wraps" else f"{r['status']}: {r.get('reason', '')}".replace("|", "\\|")
        counts = [r.get(k, "") for k in ("method", *COUNTS)]
        cells = [f"`{r['name']}`", r.get("params_m", ""), r.get("config", ""), r.get("input", ""), status, *counts]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return out


def source_commit() -> str:
    """The repository's commit (``+ local changes`` when the tree differs from it): what a page was made from."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "adaptive_depth"], cwd=root, capture_output=True)
    except OSError:
        return "unknown (no git)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + local changes to adaptive_depth/" if dirty.stdout.strip() else "")


def render(rows: list[dict[str, Any]], command: str, seconds: float, commit: str) -> str:
    """The markdown page: how it was made, counts per source, reasons for refusals and errors, per-model tables."""
    sources = [s for s in ("timm", "transformers") if any(r["source"] == s for r in rows)]
    out = [
        "# Supported models",
        "",
        "Generated by `scripts/supported_models.py`; do not edit by hand, run the script again. Each architecture is",
        "built with random weights and probed once by `adaptive_depth.discovery.discover` at its declared input size",
        "(batch 1, CPU). *wraps*: discovery found stages with skippable blocks; *refused*: nothing to gate;",
        "*error*: the model could not be built, or its probe forward pass failed; *skipped*: above the size limit",
        "(parameters counted on the meta device); *timeout*: the check ran past the time limit. transformers models",
        "use their default config with widths divided by 4 (depths kept) where that works (*config* column).",
        "*gates*: whole residual blocks, or residual branches inside blocks that have no identity path of their own.",
        "*FLOPs at s=0.5*: FLOPs of the wrapped model at s = 0.5 over its FLOPs at s = 1 (`torch.utils.flop_counter`,",
        "batch 1): near 1 means the gates hold little of the compute. tests/test_supported_models.py re-checks a",
        "sample of the rows against the code, so a page older than the discovery it describes fails the tests.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}, wall time {seconds / 60:.0f} min",
        f"- generated at commit: {commit}",
        f"- versions: timm {timm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
        "",
        "| source | checked | " + " | ".join(STATUSES) + " |",
        "|---" * (len(STATUSES) + 2) + "|",
    ]
    for source in sources:
        counts = collections.Counter(r["status"] for r in rows if r["source"] == source)
        out.append(f"| {source} | {sum(counts.values())} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    out += ["", "## Refused and why", "", "Grouped by reason (digits shown as N); errors and timeouts included.", ""]
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for r in rows:
        if r["status"] in ("refused", "error", "timeout"):
            groups[(r["status"], re.sub(r"\d+", "N", r["reason"]))].append(f"{r['source']}:{r['name']}")
    for (status, reason), names in sorted(groups.items(), key=lambda kv: (STATUSES.index(kv[0][0]), -len(kv[1]))):
        out.append(f"- **{status}** ({len(names)}) {reason}: " + ", ".join(f"`{n}`" for n in sorted(names)))
    for source in sources:
        out += ["", f"## {source}", "", *_table([r for r in rows if r["source"] == source])]
    return "\n".join(out) + "\n"


def main() -> None:
    """Parse the command line, walk the selected model lists and write the page (and optionally the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["timm", "transformers", "all"], default="all")
    parser.add_argument("--filter", default="*", help="fnmatch pattern on model names (timm name or model_type)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many models per source (0: all)")
    parser.add_argument("--max-params-m", type=float, default=60.0, help="skip models above this many M params")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("docs/supported-models.md"))
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw rows here")
    args = parser.parse_args()

    jobs: list[tuple[str, str]] = []
    if args.only in ("timm", "all"):
        jobs += [("timm", n) for n in sorted(timm.list_models(args.filter))][: args.limit or None]
    if args.only in ("transformers", "all"):
        jobs += [("transformers", n) for n in sorted(HF_NAMES) if fnmatch.fnmatch(n, args.filter)][: args.limit or None]
    start = time.monotonic()
    rows = walk(jobs, args)
    seconds = time.monotonic() - start
    command = shlex.join(["python", "scripts/supported_models.py", *sys.argv[1:]])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    args.out.write_text(render(rows, command, seconds, source_commit()))
    print(f"wrote {args.out} ({len(rows)} models, {seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
