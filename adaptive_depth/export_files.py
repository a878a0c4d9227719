"""ONNX files and ``torch.export`` programs of a depth-switchable model, checked before they are kept.

The graphs come from :mod:`adaptive_depth.export_graph`: ``pixel_values`` (batch dimension dynamic) -> ``logits``,
plus ``depth_index`` for the file that holds every trained depth. An ONNX file is run with onnxruntime and a program
with torch, on a batch of another size than the one traced, and compared with the adaptive model at every depth the
file holds; a difference is an error, so a file that is written is a file that computes what the model computes.

ONNX export needs the ``[onnx]`` extra (``onnx``, ``onnxscript`` for ``torch.onnx.export``, ``onnxruntime``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "ONNX_DATA_NAME",
    "ONNX_NAME",
    "PROGRAM_NAME",
    "check_outputs",
    "export_program",
    "onnx_session",
    "require",
    "run_onnx",
    "write_onnx",
    "write_onnx_traced",
]

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # the weights of a file over ONNX's 2 GB protobuf limit
PROGRAM_NAME = "model.pt2"
PROTOBUF_LIMIT = 2**31 - 2**26  # a file above 2 GB cannot hold its weights (with a margin for the graph)
# float32 runtimes reorder sums and fuse BatchNorm into convolutions: the difference allowed is ATOL plus RTOL of the
# largest output, not of each element (a network whose activations grow large, as random-weight MobileOne's do to
# 2e5, leaves its small outputs with the rounding of its large ones; another function differs at the outputs' scale)
ATOL, RTOL = 1e-4, 1e-4
ONNX_OPSET = 18  # torch.onnx's own default for dynamo=True: both exporters write the same opset


def require(module: str) -> ModuleType:
    """Import an optional dependency of ONNX export, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs {module}: pip install 'adaptive-depth[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from e


def export_program(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` with a dynamic first (batch) dimension on its first input, or with every shape
    fixed to the example's (``dynamic_batch=False``).

    With a dynamic batch, ``example_inputs[0]`` should have a batch of at least 2 (a batch of 1 is specialised).
    """
    dynamic = ({0: torch.export.Dim("batch")},) + (None,) * (len(example_inputs) - 1) if dynamic_batch else None
    try:
        return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch.export raises many types for code it cannot trace
        raise ConfigError(
            f"torch.export cannot trace this model ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "save the adaptive model with save_pretrained() instead"
        ) from e


def write_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """Convert ``program`` with ``torch.onnx.export`` (the output is named ``logits``) and save it at ``path``.

    Weights used by one ``If`` branch only are moved into that branch (see :func:`_weights_into_branches`).
    """
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter
    # Without gradients: in grad mode the converter's decompositions turn a reshape of a transposed tensor into a
    # view that a symbolic batch cannot take (ViT-relpos, MaxViT, Hiera, Swin failed so)
    program = _attention_of_four_dimensions(program)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter prints its progress
        proto = torch.onnx.export(program, dynamo=True, output_names=["logits"], verbose=False).model_proto
    _weights_into_branches(proto)
    _drop_node_metadata(proto.graph)
    tensors = [*program.state_dict.values(), *program.constants.values()]
    size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    # Past protobuf's 2 GB, the weights go beside the graph, in ONNX_DATA_NAME.
    external = {"all_tensors_to_one_file": True, "location": ONNX_DATA_NAME} if size > PROTOBUF_LIMIT else {}
    onnx.save_model(proto, str(path), save_as_external_data=bool(external), **external)


def _attention_of_four_dimensions(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with its attention written out as matmul and softmax where any attention takes other than 4-D
    tensors, which torch.onnx's converter cannot translate (Hiera attends within mask units, on 5-D tensors);
    ``program`` itself otherwise, so that other models keep the attention the converter writes for them."""
    attention = torch.ops.aten.scaled_dot_product_attention.default
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]  # torch.cond's
    calls = [n for graph in graphs for n in graph.nodes if n.target == attention]
    if all(getattr(n.args[0].meta.get("val"), "ndim", 4) == 4 for n in calls):
        return program
    return program.run_decompositions({attention: _attention_math})


def _attention_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` of inference (no dropout: the graphs are exported in eval mode) on tensors
    of any rank, as the operator's documentation writes it."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa:  # grouped-query attention: each key / value head serves several query heads
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def write_onnx_traced(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``module`` to ONNX at ``path`` with torch.onnx's TorchScript exporter (``dynamo=False``): the fallback
    for a single depth that ``torch.export`` cannot trace (CoaT) or whose program the ONNX converter cannot take.
    It traces one batch and marks the batch dimension dynamic; what the trace fixed (a shape that follows the
    batch) is caught by the check the caller runs at another batch size.
    """
    require("onnx")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in favour of dynamo=True
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )


def _drop_node_metadata(graph: Any) -> None:
    """Remove the exporter's per-node notes (stack traces with this machine's paths, FX nodes) from ``graph`` and
    its subgraphs: they hold nothing a runtime reads, and are a quarter of a small model's file."""
    onnx = require("onnx")
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _drop_node_metadata(attribute.g)
            for subgraph in attribute.graphs:
                _drop_node_metadata(subgraph)


def _names_read(graph: Any) -> set[str]:
    """Every value name the nodes of ``graph`` and of its subgraphs read."""
    onnx = require("onnx")
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(attribute.g)
            for subgraph in attribute.graphs:
                names |= _names_read(subgraph)
    return names


def _weights_into_branches(model: Any) -> int:
    """Move each main-graph initializer that one ``If`` branch alone reads into that branch; returns how many.

    The file is as large as before (each weight is still stored once), but onnxruntime pre-packs a convolution's
    or matrix product's weights only when they are initializers of the graph that runs the node: read from the
    outer scope, they are re-laid out at every call (measured: resnet18 with every block behind an ``If`` ran 12-17%
    slower than the same network without ``If``, and as fast once its weights sat in the branches).
    """
    onnx = require("onnx")
    graph = model.graph
    read_here = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                for name in _names_read(attribute.g):
                    readers.setdefault(name, []).append(attribute.g)
    kept, moved = [], 0
    for initializer in graph.initializer:
        branches = readers.get(initializer.name, [])
        if initializer.name not in read_here and len(branches) == 1:
            branches[0].initializer.append(initializer)
            moved += 1
        else:
            kept.append(initializer)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return moved


def onnx_session(path: Path) -> Any:
    """An onnxruntime ``InferenceSession`` of the file at ``path``, on the CPU."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the exporter leaves unused constants that onnxruntime warns about
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run an onnxruntime session on tensors; its first output, as a tensor."""
    return torch.from_numpy(session.run(None, {k: v.detach().cpu().numpy() for k, v in inputs.items()})[0])


def check_outputs(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Raise :class:`ConfigError` unless ``actual`` matches the adaptive model's ``expected`` (within ``ATOL`` plus
    ``RTOL`` of its largest magnitude); returns the largest difference."""
    expected = expected.detach().float().cpu()
    actual = actual.detach().float().cpu()
    if actual.shape != expected.shape:
        raise ConfigError(f"{what} returns shape {tuple(actual.shape)}, the adaptive model {tuple(expected.shape)}")
    diff = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not diff <= ATOL + RTOL * scale:  # NaN fails too
        raise ConfigError(
            f"{what} computes another function than the adaptive model (largest difference {diff:.3g}); nothing was "
            "saved. Report this with the model's name; save_pretrained() keeps the adaptive model meanwhile"
        )
    return diff
