"""Exports that load without this library: one depth as a timm / transformers repository, or ONNX / torch.export.

:func:`save_export` (``AdaptiveDepth.save_export``) writes one of three formats into a folder, atomically (every file
is written and checked in a temporary folder first; a README of your own is kept):

- ``"repo"`` (one depth; the default): an ordinary timm or transformers repository.

  - transformers: ``export(s).save_pretrained`` (the config's ``depths`` / ``num_hidden_layers`` already hold the
    shallower architecture), with the class names in the config and the image processor, so that
    ``AutoModelForImageClassification.from_pretrained`` and ``pipeline("image-classification")`` load it.
  - timm: ``timm.models.save_for_hf`` with the depth written as the architecture's own argument (ResNet ``layers``,
    ConvNeXt / Swin / MetaFormer ``depths``, ViT ``depth``), checked by rebuilding it with
    ``timm.create_model("local-dir:...")``; transformers' ``TimmWrapper`` (Auto classes, ``pipeline``) loads it too.
    Architectures that take no such argument (RegNet, EfficientNet, MobileNet...) are refused: use ONNX.
  - A model that gates residual branches inside blocks (TinyViT, RepViT) gives a repository at full depth only: no
    timm argument or transformers config describes a block without its branch.

- ``"onnx"``: ``model.onnx`` (input ``pixel_values`` with a dynamic batch dimension, output ``logits``) beside the
  base's ``config.json`` (class names, and for a timm base its data config) and, for a transformers base, the image
  processor's ``preprocessor_config.json``: Optimum's layout. Any architecture that wraps.
- ``"torch.export"``: ``model.pt2`` (``torch.export.save``; ExecuTorch starts from such a program) beside the same
  files.

``scaling_factor="all"`` writes ONE graph that holds every trained depth, chosen by a second input ``depth_index``
(see :mod:`adaptive_depth.export_graph`): ONNX by default, or torch.export. ``config.json`` lists which index is
which depth under ``adaptive_depth``.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi
from torch import nn

from .errors import ConfigError
from .export import config_depth_field
from .export_card import export_card
from .export_files import (
    ONNX_DATA_NAME,
    ONNX_NAME,
    PROGRAM_NAME,
    check_outputs,
    export_program,
    onnx_session,
    run_onnx,
    write_onnx,
    write_onnx_traced,
)
from .export_graph import TensorOutputs, all_depths_module
from .outputs import first_tensor, logits_of
from .preprocessing import match_channels, timm_preprocessing
from .saved import CARD_NAME, CONFIG_NAME, PROCESSOR_NAME, WEIGHTS_NAME, replace_files_atomically
from .state import preserved

if TYPE_CHECKING:
    from .model import AdaptiveDepth

__all__ = ["ALL_DEPTHS", "FORMATS", "ExportPlan", "push_export", "save_export"]

logger = logging.getLogger(__name__)

FORMATS = ("repo", "onnx", "torch.export")
ALL_DEPTHS = "all"  # the scaling factor that asks for every trained depth in one graph
FIXED_BATCH = 1  # the batch an ONNX graph is fixed to where no exporter can make the batch dimension dynamic
DEPTH_ARGUMENTS = ("layers", "depths", "depth")  # how timm architectures take their per-stage block counts
# Files one export writes and another does not: removed from the folder when this export has no such file.
EXPORT_FILES = (WEIGHTS_NAME, ONNX_NAME, ONNX_DATA_NAME, PROGRAM_NAME, PROCESSOR_NAME)


@dataclass
class ExportPlan:
    """What one :func:`save_export` call writes.

    Args:
        format: one of :data:`FORMATS`.
        depths: ``(scaling factor or None, blocks per stage)`` of each depth the export holds, in input order.
        all_depths: one graph with every trained depth, selected by ``depth_index``.
        batch_size: the batch size an ONNX graph is fixed to, where the architecture allows no dynamic batch
            (set while the file is written); None: any batch.
    """

    format: str
    depths: list[tuple[float | None, list[int]]]
    all_depths: bool = False
    batch_size: int | None = None

    @property
    def inputs(self) -> list[str]:
        """The graph's input names."""
        return ["pixel_values", "depth_index"] if self.all_depths else ["pixel_values"]

    def describe(self) -> dict[str, Any]:
        """What ``config.json`` says under ``adaptive_depth``: the format, inputs and depths."""
        depths = [{"scaling_factor": s, "blocks_per_stage": list(c)} for s, c in self.depths]
        if self.all_depths:
            depths = [{"depth_index": i, **d} for i, d in enumerate(depths)]
        fixed = {} if self.batch_size is None else {"batch_size": self.batch_size}
        return {"format": self.format, "inputs": self.inputs, **fixed, "depths": depths}


def plan_export(
    model: AdaptiveDepth, scaling_factor: float | str | None, depth: Sequence[int] | None, format: str | None
) -> ExportPlan:
    """Check the request before anything is computed or written; what to export."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(scaling_factor, str):
        if scaling_factor != ALL_DEPTHS:
            raise ConfigError(
                f"scaling_factor must be a number in (0, 1] or {ALL_DEPTHS!r} (every trained depth), got "
                f"{scaling_factor!r}"
            )
        if depth is not None:
            raise ConfigError(f"scaling_factor={ALL_DEPTHS!r} exports every trained depth: leave depth= out")
        if format == "repo":
            raise ConfigError(
                f"a timm / transformers repository holds one depth; scaling_factor={ALL_DEPTHS!r} needs "
                "format='onnx' (the default for it) or 'torch.export'"
            )
        depths = [(s, model.depth_for(s)) for s in model.config.scaling_factors]
        return ExportPlan(format or "onnx", depths, all_depths=True)
    counts, s = model.resolve_depth(scaling_factor, depth)
    plan = ExportPlan(format or "repo", [(s, counts)])
    if plan.format == "repo":
        _check_repo_possible(model, counts)
    return plan


def save_export(
    model: AdaptiveDepth,
    save_directory: str | Path,
    scaling_factor: float | str | None = None,
    *,
    depth: Sequence[int] | None = None,
    format: str | None = None,
) -> Path:
    """Write ``model`` at one depth (or every trained depth) in a format that loads without adaptive-depth.

    Args:
        model: the depth-switchable model (this function is its method ``model.save_export`` too).
        save_directory: the folder, written atomically once the export is checked (a README of your own is kept).
        scaling_factor: the depth (default: the current one), or ``"all"``: every trained depth in one ONNX or
            torch.export graph whose input ``depth_index`` picks the depth.
        depth: explicit blocks per stage instead.
        format: ``"repo"`` (the default for one depth): an ordinary timm / transformers repository, for
            architectures whose depth is a constructor argument; ``"onnx"`` (the default for ``"all"``): any
            architecture, checked in onnxruntime; ``"torch.export"``: ``model.pt2``.

    Returns:
        The folder. ``"repo"``: ``timm.create_model("local-dir:<folder>", pretrained=True)`` or transformers'
        ``AutoModelForImageClassification`` / ``pipeline("image-classification", model=<folder>)``.
    """
    plan = plan_export(model, scaling_factor, depth, format)
    folder = Path(save_directory)
    with replace_files_atomically(folder, keep_foreign=(CARD_NAME,)) as staging:
        if plan.format == "repo":
            _write_repo(model, plan.depths[0][1], staging)
        else:
            _write_graph(model, plan, staging)
        export_card(model.config.base_model, plan.format, plan.describe()).save(staging / CARD_NAME)
        stale = [name for name in EXPORT_FILES if not (staging / name).exists()]
    for name in stale:  # left by an earlier export in another format: it would not match this one
        (folder / name).unlink(missing_ok=True)
    return folder


def push_export(
    model: AdaptiveDepth,
    repo_id: str,
    scaling_factor: float | str | None = None,
    *,
    depth: Sequence[int] | None = None,
    format: str | None = None,
    **kwargs: Any,
) -> str:
    """:func:`save_export` to a temporary folder, uploaded to ``repo_id`` (``HfApi.upload_folder`` kwargs)."""
    plan_export(model, scaling_factor, depth, format)  # refuse before a repository is created
    api = HfApi(token=kwargs.pop("token", None))
    repo_id = api.create_repo(repo_id, private=kwargs.pop("private", None), exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_export(model, Path(tmp) / "export", scaling_factor, depth=depth, format=format)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)


# ---------------------------------------------------------------------- timm / transformers repositories
def _timm_depth_args(model: AdaptiveDepth, counts: Sequence[int]) -> dict[str, Any] | None:
    """The ``create_model`` argument that gives the timm base these blocks per stage (``None``: it takes none).

    The stages found are the architecture's own, in order, unless the model was built with the argument given
    explicitly and some of its stages hold a single block (no stage is found there): those keep their count. The
    rebuild check that follows every export catches any other mismatch.
    """
    from timm.models._hub import get_model_args  # the constructor arguments timm recorded

    accepted = inspect.signature(type(model.model).__init__).parameters
    name = next((n for n in DEPTH_ARGUMENTS if n in accepted), None)
    if name is None:
        return None
    if name == "depth":
        return {"depth": int(counts[0])} if len(counts) == 1 else None
    given = get_model_args(model.model, {}).get(name)
    found = [st.num_blocks for st in model.config.stages]
    if not isinstance(given, list | tuple) or len(given) == len(found):
        return {name: [int(c) for c in counts]}
    depths, j = [int(n) for n in given], 0
    for i, n in enumerate(given):  # the found stages, matched in order by their full block counts
        if j < len(found) and n == found[j]:
            depths[i], j = int(counts[j]), j + 1
    return {name: depths} if j == len(found) else None


def _check_repo_possible(model: AdaptiveDepth, counts: Sequence[int]) -> None:
    """Refuse a repository export that timm / transformers could not rebuild, naming the formats that work."""
    config, source = model.config, model.config.base_model.source
    instead = (
        "save_export(folder, s, format='onnx') (or 'torch.export') exports any depth of any architecture, and "
        "save_pretrained() keeps every depth for AdaptiveDepth.from_pretrained"
    )
    if source not in ("timm", "transformers"):
        raise ConfigError(f"this model wraps a custom module, so there is no timm / transformers repository: {instead}")
    full = [st.num_blocks for st in config.stages]
    if config.gates_branches and list(counts) != full:
        skipped = [st.name for st, n, k in zip(config.stages, full, counts) if st.kind == "branch" and k < n]
        what = (
            f"skips residual branches inside blocks (stages {skipped})"
            if skipped
            else "gates residual branches inside blocks in some stages, so its stages are not the architecture's"
        )
        raise ConfigError(
            f"cannot save blocks per stage {list(counts)} as a plain {source} repository: this model {what}, and "
            f"{source} can rebuild a network only from whole-block depths; {instead}"
        )
    if list(counts) == full:
        return  # the architecture as it is
    if source == "timm" and _timm_depth_args(model, counts) is None:
        raise ConfigError(
            f"timm's {type(model.model).__name__} takes no per-stage depth argument ({' / '.join(DEPTH_ARGUMENTS)}), "
            f"so timm cannot rebuild this depth from a repository: {instead}"
        )
    hf_config = getattr(model.model, "config", None)
    if source == "transformers" and config_depth_field(hf_config, config.stages) is None:
        raise ConfigError(
            f"the {type(hf_config).__name__} of {type(model.model).__name__} does not describe the depths of the "
            f"stages found ({[st.num_blocks for st in config.stages]} blocks), so transformers cannot rebuild this "
            f"depth from a repository: {instead}"
        )


def _write_repo(model: AdaptiveDepth, counts: list[int], folder: Path) -> None:
    plain, kept_places = model.export_checked(depth=counts)
    if kept_places:
        raise ConfigError(
            f"cannot save blocks per stage {counts} as a plain {model.config.base_model.source} repository: "
            f"{type(model.model).__name__}'s forward counts its blocks, so a network built with fewer computes "
            "another function than this depth; save_export(folder, s, format='onnx') (or 'torch.export') keeps the "
            "removed blocks' places"
        )
    plain.eval()
    if model.config.base_model.source == "transformers":
        plain.save_pretrained(folder)  # type: ignore[operator]
        _processor(model).save_pretrained(folder)
        _check_rebuild(plain, folder, model.example_input(2))
        return
    from timm.models import save_for_hf

    # A model that gates branches is exported at full depth only (see _check_repo_possible): the original arguments.
    depth_args = {} if model.config.gates_branches else _timm_depth_args(model, counts)
    save_for_hf(plain, str(folder), safe_serialization=True, **_timm_config_args(model, plain, depth_args or {}, {}))
    _drop_clashing_args(folder / CONFIG_NAME)
    _check_rebuild(plain, folder, model.example_input(2))


def _timm_config_args(
    model: AdaptiveDepth, plain: nn.Module, depth_args: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """``model_config`` / ``model_args`` / ``data_config`` of timm's ``save_for_hf`` / ``save_config_for_hf``."""
    labels = [model.id2label[i] for i in sorted(model.id2label)]
    preprocessing = timm_preprocessing(getattr(plain, "pretrained_cfg", {}))
    cfg = match_channels({**preprocessing, "input_size": model.config.input_size})
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "label_names"}
    model_config = ({"label_names": labels} if labels else {}) | extra
    return {"model_config": model_config, "model_args": depth_args, "data_config": data_config}


def _drop_clashing_args(path: Path) -> None:
    """Remove ``num_classes`` from the ``model_args`` timm records: the top-level ``num_classes`` already says it,
    and transformers' ``TimmWrapper`` passes that one too (``got multiple values for keyword argument``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    args = data.get("model_args") or {}
    if args.get("num_classes", data.get("num_classes")) == data.get("num_classes"):
        args.pop("num_classes", None)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _check_rebuild(plain: nn.Module, folder: Path, example: torch.Tensor) -> None:
    """Load the staged folder the way a user without this library would (timm, or the model's transformers class),
    and compare one output with the export's."""
    library = "transformers" if hasattr(plain, "save_pretrained") else "timm"
    try:
        if library == "transformers":
            rebuilt = type(plain).from_pretrained(folder).eval()  # type: ignore[attr-defined]
        else:
            import timm

            rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # both raise many types when arguments and weights disagree
        raise ConfigError(
            f"{library} cannot rebuild the exported depth ({type(e).__name__}: {e}); nothing was saved"
        ) from e
    with torch.no_grad(), preserved(plain, train=False):
        check_outputs(first_tensor(rebuilt(example)), first_tensor(plain(example)), f"the network {library} rebuilds")


def _processor(model: AdaptiveDepth) -> Any:
    """The model's image processor; a transformers base without one (or another base) gets its preprocessing in
    transformers' generic processor, so that ``AutoImageProcessor`` and ``pipeline()`` find one."""
    if model.image_processor is not None:
        return model.image_processor
    import transformers

    cfg = match_channels(model.data_config)
    h, w = cfg["input_size"][-2:]
    return transformers.ViTImageProcessor(
        size={"height": h, "width": w}, image_mean=list(cfg["mean"]), image_std=list(cfg["std"])
    )


# ---------------------------------------------------------------------- ONNX and torch.export
def _write_graph(model: AdaptiveDepth, plan: ExportPlan, folder: Path) -> None:
    """Trace, write and check the graph of ``plan``, then its config (and processor) beside it."""
    if plan.all_depths:
        module: nn.Module = all_depths_module(model)
    else:
        module = TensorOutputs(model.export(depth=plan.depths[0][1])).eval()
    if plan.format == "onnx":
        exporter = _write_onnx(model, plan, module, folder / ONNX_NAME)
        session = onnx_session(folder / ONNX_NAME)
        what = "the ONNX file" + ("" if exporter == "torch.export" else f" of the {exporter}")
        for feed, want, name in _checks(model, plan):
            check_outputs(run_onnx(session, dict(zip(plan.inputs, feed))), want, f"{what} at {name} in onnxruntime")
    else:
        with torch.no_grad():
            program = export_program(module, _example(model, plan))
            for feed, want, name in _checks(model, plan):
                check_outputs(program.module()(*feed), want, f"the torch.export program at {name}")
        torch.export.save(program, folder / PROGRAM_NAME)
    _write_graph_config(model, plan, module, folder)


def _example(model: AdaptiveDepth, plan: ExportPlan) -> tuple[torch.Tensor, ...]:
    """What the graph is traced with: a batch of 2 (a batch of 1 would be fixed in the graph) or the fixed batch,
    and for the all-depth graph the first depth index."""
    x = model.example_input(plan.batch_size or 2)
    return (x, torch.tensor(0, device=x.device)) if plan.all_depths else (x,)


def _checks(model: AdaptiveDepth, plan: ExportPlan) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor, str]]:
    """``(inputs, the adaptive model's logits, name)`` at every depth of ``plan``, on other images than the traced
    ones: a batch of another size, or where the batch is fixed, the same size of other images."""
    x = model.example_input(3) if plan.batch_size is None else model.example_input(2 * plan.batch_size)
    x = x if plan.batch_size is None else x[plan.batch_size :]
    checks = []
    with torch.no_grad(), preserved(model, train=False):
        for i, (s, counts) in enumerate(plan.depths):
            want = logits_of(model.set_depth(counts)(x))
            name = f"s = {s}, blocks per stage {counts}"
            if plan.all_depths:
                checks.append(((x, torch.tensor(i, device=x.device)), want, f"depth_index {i} ({name})"))
            else:
                checks.append(((x,), want, name))
    return checks


def _write_onnx(model: AdaptiveDepth, plan: ExportPlan, module: nn.Module, path: Path) -> str:
    """Write ``module`` to ONNX at ``path`` from its ``torch.export`` program, with a dynamic batch; where that
    program cannot be made or converted, for one depth with the TorchScript exporter instead (the all-depth graph
    needs ``torch.cond``); where neither can make the batch dynamic (CondConv mixes each image's kernels into a
    convolution grouped by the batch, whose group count ONNX holds constant), from a program of a fixed batch of
    :data:`FIXED_BATCH`, which ``plan.batch_size`` then records. Returns which route wrote the file, for the
    check's message.

    Raises:
        ConfigError: no route could write the file (each route's reason given).
    """
    reasons = []
    try:
        with torch.no_grad():
            write_onnx(export_program(module, _example(model, plan)), path)
        return "torch.export"
    except ImportError:
        raise
    except Exception as e:  # the exporters raise many types for code they cannot convert
        reasons.append(f"torch.export route: {_first_line(e)}")
    if not plan.all_depths:
        logger.info("the torch.export route to ONNX failed (%s); trying the TorchScript exporter", reasons[-1])
        try:
            with torch.no_grad():
                write_onnx_traced(module, _example(model, plan)[0], path)
            return "TorchScript exporter"
        except ImportError:
            raise
        except Exception as e:
            reasons.append(f"TorchScript exporter: {_first_line(e)}")
    logger.info("no route with a dynamic batch worked (%s); trying a fixed batch of %d", reasons, FIXED_BATCH)
    plan.batch_size = FIXED_BATCH
    try:
        with torch.no_grad():
            write_onnx(export_program(module, _example(model, plan), dynamic_batch=False), path)
        return f"torch.export route at a fixed batch of {FIXED_BATCH}"
    except ImportError:
        raise
    except Exception as e:
        plan.batch_size = None
        reasons.append(f"at a fixed batch of {FIXED_BATCH}: {_first_line(e)}")
    raise ConfigError(
        f"no ONNX exporter could convert this model: {'; '.join(reasons)}. Export another format "
        f"(format='torch.export'{', or one depth at a time' if plan.all_depths else ''}) or save the adaptive model "
        "with save_pretrained()"
    )


def _first_line(error: BaseException) -> str:
    """An exporter's error in one line: its type and first line, without the terminal colours some print. Where
    torch.onnx's converter failed on one operator (its first line says only "Failed to convert"), the operator and
    the innermost error of its exception summary instead."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    causes = re.findall(r"^<class '(?:[\w.]+\.)?(\w+)'>: (.*)$", text.partition("## Exception summary")[2], re.M)
    target = re.search(r"target=(torch\.ops\.[\w.]+)", text)
    if causes and target:
        return f"{type(error).__name__}: cannot translate {target.group(1)} ({causes[0][0]}: {causes[0][1][:150]})"
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _write_graph_config(model: AdaptiveDepth, plan: ExportPlan, module: nn.Module, folder: Path) -> None:
    """``config.json`` (the base's own format, with ``id2label`` and ``adaptive_depth``) and the preprocessing."""
    source = model.config.base_model.source
    extra = {"adaptive_depth": plan.describe()}
    if source == "transformers":
        plain = module.model  # type: ignore[union-attr] # TensorOutputs / AllDepthsModule: the transformers model
        config = copy.deepcopy(plain.config)
        config.adaptive_depth = extra["adaptive_depth"]
        config.save_pretrained(folder)
        _processor(model).save_pretrained(folder)
    elif source == "timm":
        from timm.models._hub import save_config_for_hf  # save_for_hf without the weights

        counts = plan.depths[0][1]
        described = not plan.all_depths and not model.config.gates_branches  # else the architecture's own depth
        depth_args = (_timm_depth_args(model, counts) if described else None) or {}
        id2label = {str(i): n for i, n in sorted(model.id2label.items())}
        extra |= {"id2label": id2label} if id2label else {}
        args = _timm_config_args(model, model.model, depth_args, extra)
        save_config_for_hf(model.model, str(folder / CONFIG_NAME), **args)
        _drop_clashing_args(folder / CONFIG_NAME)
    else:
        id2label = {str(i): n for i, n in sorted(model.id2label.items())}
        (folder / CONFIG_NAME).write_text(json.dumps({"id2label": id2label, **extra}, indent=2), encoding="utf-8")
        _processor(model).save_pretrained(folder)
