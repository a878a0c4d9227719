"""Walk timm's and transformers' model lists and record what adaptive-depth's discovery finds.

    python scripts/supported_models.py --only all --workers 1           # the full walk, writes docs/
    python scripts/supported_models.py --only timm --filter 'resnet*' --limit 10 --out /tmp/x.md
    python scripts/supported_models.py --update-exports --budget-min 90  # the exports column of docs/, per family
    python scripts/supported_models.py --update-exports --only-missing   # carry on where the last one stopped
    python scripts/supported_models.py --update-exports --only-missing --every-model --budget-min 60  # model by model
    python scripts/supported_models.py --update-exports --filter 'mvitv2*'  # these rows again; the others stay

Every architecture is built with random weights (nothing is downloaded) and probed once by ``discover`` at its
declared input size, batch 1, on CPU. Parameters are first counted on the meta device; models above
``--max-params-m`` are skipped. Transformers configs are narrowed (widths divided by 4, depths kept) when that
builds and runs; otherwise the default config is used. Each model runs in a worker process that is killed after
``--timeout`` seconds and recycled every few models, so one hanging or huge model cannot stop the walk.

``--exports`` also writes every wrapping model at s = 0.5 in each plain format, checked as ``save_export`` checks it
(a timm / transformers repository rebuilt and compared, a torch.export program run, an ONNX file run in
onnxruntime): tens of seconds a model on a CPU. ``--update-exports`` does that for the smallest wrapping model of each
family (timm module, transformers model type) of the existing page within ``--budget-min``, and rewrites those rows;
with ``--filter`` it checks every wrapping model whose name matches, and leaves the other rows as they are.
``--keep-exports`` walks afresh (discovery, FLOPs) and keeps the exports cells the page's rows had: for a change
that moves the other columns and not the exports (the FLOPs of attention on the CPU, counted from revision 2).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import gc
import json
import logging
import multiprocessing as mp
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as HF_NAMES

from adaptive_depth import AdaptiveDepth, AdaptiveDepthConfig
from adaptive_depth.base_models import describe_base_model
from adaptive_depth.config import GATE_LABELS
from adaptive_depth.discovery import Discovery, discover
from adaptive_depth.errors import ConfigError, NoGateableBlocksError
from adaptive_depth.flops import count_flops_by_module
from adaptive_depth.policy import active_mask, keep_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the page module beside this script, however it is loaded
from supported_models_page import EXPORTS, export_targets, header_lines, parse_page, render

RECYCLE_EVERY = 25  # models per worker process before it is replaced (bounds leaked memory)
SAVE_EVERY = 25  # rows between saves of the partial results, so that an interrupted walk loses at most these
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "embed_dim", "hidden_sizes", "embed_dims")
# What the page says for the usual reasons a format is refused (others: the error, shortened).
EXPORT_REASONS = {
    "takes no per-stage depth argument": "no timm depth argument",
    "residual branches inside blocks": "gates branches",
    "does not describe the depths": "config lacks the depths",
    "timm cannot rebuild": "timm cannot rebuild it",
    "transformers cannot rebuild": "transformers cannot rebuild it",
    "cannot find logits": "returns no logits",
    "no ONNX exporter": "no ONNX exporter converts it",
    "forward counts its blocks": "its forward counts its blocks",
}


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


def _discover_row(model: torch.nn.Module, size: tuple[int, ...]) -> tuple[dict[str, Any], Discovery]:
    """Run discovery on a built model; the fields of a 'wraps' row and what was found (raises what discovery raises).

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
    }, found


def _exports(model: torch.nn.Module, found: Discovery, size: tuple[int, ...]) -> str:
    """The plain formats s = 0.5 of ``model`` saves to, each written and checked by ``save_export``; a failed format
    is named with its reason (``"ONNX, torch.export (repo: no timm depth argument)"``)."""
    config = AdaptiveDepthConfig(
        base_model=describe_base_model(model), stages=found.stages, input_size=list(size), discovery=found.method
    )
    adaptive = AdaptiveDepth(model, config).eval()  # what wrap() makes, without probing again
    works, fails = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, label in EXPORTS.items():  # ONNX too where torch.export fails: the TorchScript exporter may take it
            try:
                folder = adaptive.save_export(f"{tmp}/{len(works) + len(fails)}", 0.5, format=fmt)
                fixed = json.loads((folder / "config.json").read_text()).get("adaptive_depth", {}).get("batch_size")
                works.append(label + (f" [batch {fixed}]" if fixed else ""))  # no dynamic batch (CondConv)
            except Exception as e:  # any failure is a result to record
                # the error's first line, without the terminal colours some exporters print
                reason = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}").splitlines()[0]
                fails[label] = next((short for key, short in EXPORT_REASONS.items() if key in reason), reason[:100])
    failed = "; ".join(f"{label}: {reason}" for label, reason in fails.items())
    return ", ".join(works) + (f" ({failed})" if works and failed else failed if failed else "")


def check(source: str, name: str, max_params_m: float, exports: bool = False) -> dict[str, Any]:
    """Build one model with random weights, run discovery on it and describe the outcome.

    Args:
        source: ``"timm"`` or ``"transformers"``.
        name: a timm architecture name or a transformers ``model_type``.
        max_params_m: models with more parameters (millions) are skipped, not built.
        exports: also save s = 0.5 of a wrapping model in every plain format (``exports``, see :func:`_exports`).

    Returns:
        A row: ``source``, ``name``, ``status`` (one of ``STATUSES``), ``params_m``, ``config``, ``input``,
        and either the discovery counts (and ``exports``) or a ``reason``.
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
                counts, found = _discover_row(model, size)
                row.update(counts)
                if exports:
                    row["exports"] = _exports(model, found, size)
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


def _worker(conn: Connection, max_params_m: float, exports: bool) -> None:
    """Worker process: answer ``(source, name)`` jobs with rows until told to stop (``None``)."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # exports log what they check; the row says the outcome
    conn.send("ready")
    while (job := conn.recv()) is not None:
        t0 = time.monotonic()
        conn.send({**check(*job, max_params_m, exports), "seconds": round(time.monotonic() - t0, 1)})


def walk(
    jobs: list[tuple[str, str]],
    args: argparse.Namespace,
    save: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Check every job in worker processes, killing one that runs past ``args.timeout``; rows in job order.

    Every ``SAVE_EVERY`` rows the rows so far go to ``args.json`` and to ``save`` (the page written as it grows), so
    a walk of hours that is interrupted keeps what it checked."""
    ctx, pending, rows = mp.get_context("spawn"), collections.deque(jobs), {}
    idle: list[dict[str, Any]] = []
    busy: dict[Connection, dict[str, Any]] = {}

    def start() -> dict[str, Any]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, args.max_params_m, args.exports), daemon=True)
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
        if len(rows) % SAVE_EVERY == 0:
            if args.json:
                args.json.write_text(json.dumps(list(rows.values()), indent=1))
            if save is not None:
                save(list(rows.values()))

    def failed(w: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
        return {"source": w["job"][0], "name": w["job"][1], "status": status, "reason": reason}

    deadline = time.monotonic() + args.budget_min * 60 if args.budget_min else float("inf")
    while pending or busy:
        if time.monotonic() > deadline and pending:  # out of time: the rest stays unchecked
            print(f"time budget spent: {len(pending)} models not checked")
            pending.clear()
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
    return [rows[job] for job in jobs if job in rows]


def _with_exports(row: dict[str, Any], checked: dict[str, Any] | None, keep: bool = False) -> dict[str, Any]:
    """A page row after ``--update-exports``: the row checked again when it was (a model that ran past the time
    limit keeps its discovery columns and says so in the exports cell); else the row as it was with ``keep``
    (``--only-missing``), without an exports cell otherwise."""
    if checked is None:
        return row if keep else {k: v for k, v in row.items() if k != "exports"}
    if checked["status"] == "timeout":
        return {**row, "exports": f"not checked: {checked['reason']}"}
    return checked


def _keep_exports(rows: list[dict[str, Any]], old_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` of a fresh walk, each wrapping model with the exports cell its row of ``old_rows`` had."""
    cells = {(r["source"], r["name"]): r["exports"] for r in old_rows if r.get("exports")}
    return [
        r | {"exports": cells[(r["source"], r["name"])]}
        if r["status"] == "wraps" and (r["source"], r["name"]) in cells
        else r
        for r in rows
    ]


def main() -> None:
    """Parse the command line, walk the selected model lists and write the page (and optionally the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["timm", "transformers", "all"], default="all")
    parser.add_argument("--filter", default="*", help="fnmatch pattern on model names (timm name or model_type)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many models per source (0: all)")
    parser.add_argument("--max-params-m", type=float, default=60.0, help="skip models above this many M params")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--exports", action="store_true", help="also check the plain exports of wrapping models")
    parser.add_argument("--update-exports", action="store_true", help="only the exports column of --out, per family")
    parser.add_argument(
        "--only-missing", action="store_true", help="with --update-exports: families with no exports cell yet"
    )
    parser.add_argument(
        "--every-model", action="store_true", help="with --update-exports: every wrapping model, after the families"
    )
    parser.add_argument(
        "--keep-exports", action="store_true", help="a fresh walk that keeps the exports cells of --out's rows"
    )
    parser.add_argument("--budget-min", type=float, default=0, help="start no model after this many minutes (0: no)")
    parser.add_argument("--out", type=Path, default=Path("docs/supported-models.md"))
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw rows here")
    args = parser.parse_args()
    args.exports = args.exports or args.update_exports
    command = shlex.join(["python", "scripts/supported_models.py", *sys.argv[1:]])

    start = time.monotonic()
    if args.update_exports:  # the page's rows stay; the families' rows are checked again, exports included
        header, rows = parse_page(args.out)
        some = args.filter != "*"  # only the models it names are checked again; every other row stays as it is
        keep = args.only_missing or some
        if not keep:  # a fresh column: the lines of earlier runs go with their cells
            header = [line for line in header if not line.startswith("- exports ")]
        page_rows = rows
        targets = export_targets(rows, args.only_missing, args.every_model, args.filter)

        def merged(checked_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            checked = {(r["source"], r["name"]): r for r in checked_rows}
            return [_with_exports(r, checked.get((r["source"], r["name"])), keep) for r in page_rows]

        def save(checked_rows: list[dict[str, Any]]) -> None:  # the page so far: --only-missing carries on from it
            lines = header_lines(command, time.monotonic() - start, "exports column: ")
            args.out.write_text(render(merged(checked_rows), header + lines))

        rows = merged(walk(targets, args, save))
        header += header_lines(command, time.monotonic() - start, "exports column: ")
    else:
        jobs: list[tuple[str, str]] = []
        if args.only in ("timm", "all"):
            jobs += [("timm", n) for n in sorted(timm.list_models(args.filter))][: args.limit or None]
        if args.only in ("transformers", "all"):
            names = [n for n in sorted(HF_NAMES) if fnmatch.fnmatch(n, args.filter)]
            jobs += [("transformers", n) for n in names][: args.limit or None]
        rows = walk(jobs, args)
        header = header_lines(command, time.monotonic() - start)
        if args.keep_exports:  # discovery and FLOPs counted again; the exports checked before stay with their rows
            old_header, old_rows = parse_page(args.out)
            rows = _keep_exports(rows, old_rows)
            header += [line for line in old_header if line.startswith("- exports column: ")]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    args.out.write_text(render(rows, header))
    print(f"wrote {args.out} ({len(rows)} models, {(time.monotonic() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
