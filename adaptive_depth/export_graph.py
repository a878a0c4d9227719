"""Plain graphs for ONNX and ``torch.export``: one depth, or every trained depth in one graph.

- :class:`TensorOutputs` makes any classifier a module from ``pixel_values`` to a ``logits`` tensor (transformers
  models return a ``ModelOutput``), the signature ONNX runtimes and Optimum's layout expect.
- :func:`all_depths_module` builds one module whose depth is an input, ``depth_index`` (a 0-d int64 tensor: the
  index of a trained scaling factor in ``config.scaling_factors``). Weights are held once. Every gateable unit runs
  behind a ``torch.cond`` on its row of a ``[depths, units]`` boolean table, which ONNX writes as an ``If`` node:
  a skipped block is not computed, as with the gates. BatchNorm layers whose statistics differ between the trained
  depths read them from ``[depths, channels]`` tables by the same index, so every depth runs with its own
  recalibrated statistics; layers whose statistics agree at every depth keep constant ones (runtimes fold those
  into the convolution before them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import BlockSpec
from .gates import unwrap_gates
from .norms import batchnorm_layers
from .outputs import logits_of
from .policy import active_mask
from .state import preserved

if TYPE_CHECKING:
    from .tuner import DepthTuner

__all__ = ["AllDepthsModule", "CondGate", "TensorOutputs", "all_depths_module"]


class TensorOutputs(nn.Module):
    """``model`` as a function of ``pixel_values`` returning the ``logits`` tensor (the names ONNX inputs get)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(pixel_values))


class _DepthInput:
    """The depth of the pass in progress, read by every :class:`CondGate` (set by :class:`AllDepthsModule`)."""

    keep: torch.Tensor | None = None  # bool [units]: which gateable units run


class CondGate(nn.Module):
    """A gateable block (or branch) that runs when its entry of the graph's depth row is true.

    The skipped side returns the block's input (a copy: a ``torch.cond`` branch may not return its operand), or
    zeros for a residual branch, in the structure the block returns, as :class:`~adaptive_depth.gates.DepthGate`
    does. The block is kept as ``base_layer`` so that layer names match the adaptive model's.
    """

    def __init__(self, block: nn.Module, spec: BlockSpec, slot: int, depth: _DepthInput) -> None:
        super().__init__()
        self.base_layer = block
        self.slot = slot
        self.input_kwarg = spec.input_kwarg
        self.tuple_len = spec.output_len if spec.output == "tuple" else 0
        self.inputs_len = spec.output_len if spec.output == "inputs" else 0  # returns each of its first arguments
        self.zeros_when_off = spec.kind == "branch"
        self._depth = depth

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        keep = self._depth.keep[self.slot]  # type: ignore[index] # set by AllDepthsModule for the pass
        if self.inputs_len:
            return self._inputs_cond(keep, args, kwargs)
        by_keyword = self.input_kwarg is not None and not args
        x = kwargs[self.input_kwarg] if by_keyword else args[0]

        def run(inner: torch.Tensor) -> torch.Tensor:
            if by_keyword:
                out = self.base_layer(*args, **{**kwargs, self.input_kwarg: inner})
            else:
                out = self.base_layer(inner, *args[1:], **kwargs)
            return out[0] if self.tuple_len else out

        def skip(inner: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(inner) if self.zeros_when_off else inner.clone()

        y = torch.cond(keep, run, skip, (x,))
        return (y,) + (None,) * (self.tuple_len - 1) if self.tuple_len else y

    def _inputs_cond(self, keep: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """A block that returns what it takes: its tensors go through the condition; a plain value (MViTv2's
        ``feat_size``) is handed on as it came, as discovery checked the block does."""
        inputs, rest = list(args[: self.inputs_len]), args[self.inputs_len :]
        slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]

        def run(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            full = list(inputs)
            for i, x in zip(slots, xs):
                full[i] = x
            out = self.base_layer(*full, *rest, **kwargs)
            return tuple(out[i] for i in slots)

        ys = torch.cond(keep, run, lambda *xs: tuple(x.clone() for x in xs), tuple(inputs[i] for i in slots))
        for i, y in zip(slots, ys):
            inputs[i] = y
        return tuple(inputs)


class AllDepthsModule(nn.Module):
    """A plain copy of a depth-switchable model that runs any trained depth, chosen by an input.

    Args:
        model: the base model with :class:`CondGate` units (see :func:`all_depths_module`).
        keep: ``[depths, units]`` bool: which gateable units run at each trained depth.
        norms: BatchNorm layers of ``model`` by name, with ``[depths, C]`` running means and variances.
        depth: the object the gates read the current row from.
    """

    def __init__(
        self,
        model: nn.Module,
        keep: torch.Tensor,
        norms: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]],
        depth: _DepthInput,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("keep", keep)
        self._norm_layers = [layer for layer, _, _ in norms.values()]  # plain list: registered inside ``model``
        for i, (_, means, variances) in enumerate(norms.values()):
            self.register_buffer(f"norm{i}_means", means)
            self.register_buffer(f"norm{i}_vars", variances)
        self._depth = depth

    @property
    def num_depths(self) -> int:
        """How many depths ``depth_index`` can select."""
        return int(self.keep.shape[0])

    def forward(self, pixel_values: torch.Tensor, depth_index: torch.Tensor) -> torch.Tensor:
        # embedding(), not table[index]: one ONNX Gather by the scalar input (indexing would make it a Python int)
        index = depth_index.reshape(()).long()
        with self._statistics_of(index):
            self._depth.keep = nn.functional.embedding(index, self.keep.to(torch.uint8)).bool()
            try:
                return logits_of(self.model(pixel_values))
            finally:
                self._depth.keep = None

    @contextmanager
    def _statistics_of(self, index: torch.Tensor) -> Iterator[None]:
        """Point each selected layer's running statistics at row ``index`` of its tables (as DepthNorms swaps sets)."""
        saved = []
        for i, layer in enumerate(self._norm_layers):
            saved.append((layer, layer._buffers["running_mean"], layer._buffers["running_var"]))
            layer._buffers["running_mean"] = nn.functional.embedding(index, getattr(self, f"norm{i}_means"))
            layer._buffers["running_var"] = nn.functional.embedding(index, getattr(self, f"norm{i}_vars"))
        try:
            yield
        finally:
            for layer, mean, var in saved:
                layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var


def all_depths_module(tuner: DepthTuner) -> AllDepthsModule:
    """Every trained depth of ``tuner`` (``config.scaling_factors``, in order) in one plain module (eval mode).

    ``tuner`` is left at its depth; its weights are copied once.
    """
    factors = tuner.config.scaling_factors
    plain = unwrap_gates(copy.deepcopy(tuner.model)).eval()
    depth = _DepthInput()
    units = [b for st in tuner.stages for b in st.blocks if b.gateable]
    for slot, spec in enumerate(units):
        plain.set_submodule(spec.name, CondGate(plain.get_submodule(spec.name), spec, slot, depth))
    rows = []
    for s in factors:
        counts = tuner.depth_for(s)
        masks = [active_mask(st.gateable, k, tuner.config.policy) for st, k in zip(tuner.stages, counts)]
        rows.append([on for st, mask in zip(tuner.stages, masks) for b, on in zip(st.blocks, mask) if b.gateable])
    keep = torch.tensor(rows, dtype=torch.bool, device=next(plain.parameters()).device)

    stats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    with preserved(tuner):
        for s in factors:
            tuner.set_scaling_factor(s)  # swaps in that depth's BatchNorm statistics, if it has its own
            for name, layer in batchnorm_layers(tuner.model).items():
                stats.setdefault(name, []).append((layer.running_mean.clone(), layer.running_var.clone()))
    layers = batchnorm_layers(plain)
    norms = {}
    for name, sets in stats.items():
        means, variances = torch.stack([m for m, _ in sets]), torch.stack([v for _, v in sets])
        if all(torch.equal(t, t[:1].expand_as(t)) for t in (means, variances)):
            layers[name].running_mean, layers[name].running_var = means[0], variances[0]  # constants suffice
            continue
        norms[name] = (layers[name], means, variances)
    return AllDepthsModule(plain, keep, norms, depth).eval()
