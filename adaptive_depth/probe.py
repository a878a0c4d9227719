"""The generic probe of discovery: one recorded forward pass, and the zero-weight test of a residual block.

:func:`probe` runs the model once and records, for every submodule, its first call: the shape and dtype of the
tensor it transforms and of the tensor it returns, and, for the modules that the zero-weight test may need (those
with parameters that keep their input's shape), the call's arguments. Everything else is released as the pass goes,
so that a large model at a high resolution is not held in memory activation by activation.

:func:`is_residual` is that test: a module is residual when it passes its input through once all its parameters are
zero, up to a trailing activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import ConfigError

__all__ = ["Call", "is_residual", "keeps_shape", "main_input", "probe"]


@dataclass
class Call:
    """What one module saw during the probe forward pass (its first call).

    Args:
        order: position of the first call among all modules' first calls.
        calls: how many times the module was called.
        args, kwargs: the first call's arguments, kept only while the zero-weight test may need them (``None``
            once released).
        input_kwarg: keyword that carried the main input (``None``: the first positional argument).
        input_meta: shape and dtype of the main input (``None``: no tensor).
        output_meta: shape and dtype of the main output (``None``: no tensor, or not recorded).
        output: ``"tensor"``, ``"tuple"`` (the main output came first in a tuple), or ``"inputs"`` (a tuple of as
            many tensors as the module's first positional arguments, each of its argument's shape and dtype: TNT's
            blocks take and return ``(pixel_embed, patch_embed)``).
        output_len: length of that tuple.
    """

    order: int
    calls: int
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None
    input_kwarg: str | None = None
    input_meta: tuple[torch.Size, torch.dtype] | None = None
    output_meta: tuple[torch.Size, torch.dtype] | None = None
    output: str = "tensor"
    output_len: int = 1


def main_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, str | None]:
    """The tensor a block transforms, and the keyword it came by (None: first positional argument)."""
    if args:
        return (args[0], None) if isinstance(args[0], torch.Tensor) else (None, None)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, key
    return None, None


def _main_output(output: Any) -> tuple[torch.Tensor | None, str, int]:
    """The tensor a block returns, whether it came alone or first in a tuple, and the tuple length."""
    if isinstance(output, torch.Tensor):
        return output, "tensor", 1
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return output[0], "tuple", len(output)
    return None, "tensor", 1


def _returns_its_inputs(args: tuple[Any, ...], output: Any) -> bool:
    """True if ``output`` is a tuple of two or more values that stand for the first positional arguments, one for
    one: the first a tensor, each tensor shaped like its argument, any other value equal to it (MViTv2's blocks take
    and return ``(x, feat_size)``, the feature map's height and width as a list)."""
    if type(output) is not tuple or len(output) < 2 or len(args) < len(output):
        return False
    return isinstance(output[0], torch.Tensor) and all(_stands_for(a, o) for a, o in zip(args, output))


def _stands_for(arg: Any, out: Any) -> bool:
    """True if ``out`` can take ``arg``'s place: a tensor of its shape and dtype, or the same plain value."""
    if isinstance(arg, torch.Tensor) or isinstance(out, torch.Tensor):
        return isinstance(arg, torch.Tensor) and isinstance(out, torch.Tensor) and _meta(arg) == _meta(out)
    if isinstance(arg, (list, tuple)) and isinstance(out, (list, tuple)):  # torch.Size in, a list out: both sizes
        return list(arg) == list(out) and all(isinstance(v, int) for v in arg)
    return type(arg) is type(out) and isinstance(arg, (int, float)) and arg == out


def _meta(x: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    return x.shape, x.dtype


def keeps_shape(call: Call) -> bool:
    """True if the module returned a tensor of its main input's shape and dtype."""
    return call.input_meta is not None and call.output_meta == call.input_meta


def probe(model: nn.Module, example_input: torch.Tensor) -> dict[str, Call]:
    """Run one forward pass and record the first call of every submodule, in call order."""
    calls: dict[str, Call] = {}
    with_params = {name for name, m in model.named_modules() if next(m.parameters(), None) is not None}
    handles = []

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = calls.get(name)
            if call is not None:
                call.calls += 1
                call.args = call.kwargs = None  # a module called twice is never a block: the test needs no input
                return
            x, kwarg = main_input(args, kwargs)
            keep = name in with_params  # only modules with parameters are tested with zero weights
            calls[name] = Call(
                order=len(calls),
                calls=1,
                args=args if keep else None,
                kwargs=dict(kwargs) if keep else None,
                input_kwarg=kwarg,
                input_meta=(x.shape, x.dtype) if x is not None else None,
            )

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _kwargs: Any, output: Any) -> None:
            call = calls[name]
            if call.calls != 1:
                return
            y, call.output, call.output_len = _main_output(output)
            if _returns_its_inputs(args, output):
                call.output = "inputs"
            call.output_meta = (y.shape, y.dtype) if y is not None else None
            if not keeps_shape(call):
                call.args = call.kwargs = None  # only a shape-keeping module can be a block

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:
        raise ConfigError(
            f"the probe forward pass on an input of shape {tuple(example_input.shape)} failed ({e}); "
            "pass an input the model accepts with `example_input=` (or `input_size=`)"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    return calls


# A residual block may end in an activation: ``act(x + f(x))``. With zero weights it gives ``act(x)``.
_TRAILING_ACTIVATIONS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda t: t,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.gelu,
    lambda t: F.gelu(t, approximate="tanh"),
    F.hardswish,
    F.elu,
    F.mish,
)
_RTOL = 1e-4
_SAMPLE = 4096  # elements compared first, to refuse a module without computing ten activations of a large tensor


def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat[:: max(1, flat.numel() // _SAMPLE)].float()


def _clearly_differs(y: torch.Tensor, expected: torch.Tensor, atol: float) -> bool:
    """True if some element is off by twice ``allclose``'s tolerance, so ``allclose`` on the whole is False.

    The margin absorbs the last-bit differences of an activation computed on a strided sample instead of the whole
    tensor, so this never refuses what ``allclose`` would accept.
    """
    return bool(((y - expected).abs() > 2 * (atol + _RTOL * expected.abs())).any())


def is_residual(module: nn.Module, call: Call) -> bool:
    """True if the module passes its input through when all its parameters are zero.

    A residual block ``act(x + f(x))`` becomes ``act(x)`` for the identity or a standard activation (ReLU,
    LeakyReLU, SiLU, GELU...). A plain conv or norm layer gives zeros, and a gating module such as
    squeeze-excitation gives ``x / 2``; neither passes.
    """
    if call.args is None or call.kwargs is None:
        return False
    x, _ = main_input(call.args, call.kwargs)
    params = dict(module.named_parameters())
    if not params or x is None or not _telling(x):
        return False
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    ran, output = _run_with_zeros(module, zeros, call.args, call.kwargs)
    if not ran:
        return False
    if call.output == "inputs":  # everything it hands on must come through, or a skip would change one
        return _returns_its_inputs(call.args, output) and all(
            _passes_through(a, o) if isinstance(a, torch.Tensor) else _stands_for(a, o)
            for a, o in zip(call.args, output)
        )
    if not _main_output_passes_through(x, output):
        return False
    # Near zero SiLU and GELU are x / 2, which a gate such as squeeze-excitation returns with zero weights: a fresh
    # model's tiny activations (|x| < 1e-3 in random-weight EfficientNet-B3's last stage) cannot tell the two apart,
    # so a small input is given again at unit spread, where those activations are far from linear.
    spread = float(x.float().std())
    if spread >= 1.0:
        return True
    scaled = x / spread  # and wherever else the block was handed x itself (DLA passes it again as the shortcut)
    args = tuple(scaled if a is x else a for a in call.args)
    kwargs = {k: scaled if v is x else v for k, v in call.kwargs.items()}
    ran, output = _run_with_zeros(module, zeros, args, kwargs)
    return ran and _main_output_passes_through(scaled, output)


def _run_with_zeros(
    module: nn.Module, zeros: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    """``(True, output)`` of the module run without gradients with its parameters replaced by ``zeros``;
    ``(False, None)`` when it cannot run so (an exotic module that is no block we can reason about)."""
    try:
        with torch.no_grad():
            return True, functional_call(module, zeros, args, kwargs)
    except Exception:
        return False, None


def _main_output_passes_through(x: torch.Tensor, output: Any) -> bool:
    """True if the main tensor of ``output`` passes ``x`` through (see :func:`_passes_through`)."""
    y, _, _ = _main_output(output)
    return y is not None and _passes_through(x, y)


def _telling(x: torch.Tensor) -> bool:
    """False for an input too degenerate to tell a pass-through from zeros: constant (e.g. after a zero-init layer),
    or with no positive value (``ReLU(x)`` would be all zeros, like the output of a zeroed conv)."""
    return x.is_floating_point() and float(x.float().std()) != 0.0 and bool(x.max() > 0)


def _passes_through(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True if ``y`` is ``x``, or ``act(x)`` for one of the activations a residual block may end in."""
    if y.shape != x.shape or not _telling(x):
        return False
    low, high = torch.aminmax(x)
    atol = 1e-4 * max(abs(float(low)), abs(float(high)))  # relative: fresh models can carry tiny activations
    xs, ys = _sample(x), _sample(y)
    plausible = [act for act in _TRAILING_ACTIVATIONS if not _clearly_differs(ys, act(xs), atol)]
    if not plausible or not torch.isfinite(y).all():
        return False
    x, y = x.float(), y.float()
    # act(x) must be told apart from the zeros of a zeroed plain layer: where the input reaches 1e5 (random-weight
    # HRNet, MobileOne), the tolerance exceeds 6 and relu6(x) is "close" to zeros, which made BatchNorms blocks
    return any(
        torch.allclose(y, a, rtol=_RTOL, atol=atol) and not torch.allclose(a, torch.zeros_like(a), rtol=0, atol=atol)
        for a in map(lambda act: act(x), plausible)
    )
