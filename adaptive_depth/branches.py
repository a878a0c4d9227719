"""Residual branches: sub-modules whose output their block only adds to a shortcut.

Some blocks have no identity path as a whole: TinyViT's block runs a depthwise convolution between its two residual
adds, RepViT's token mixer ends in a BatchNorm. They still hold *residual branches*, with the add written inline in
the block's forward (``x = shortcut + drop_path(attn(x))``, ``return identity + channel_mixer(x)``). A branch that is
not called and hands back zeros turns that add into ``shortcut + 0``, bitwise the shortcut: skipping it is exact.

The test is exact, not a name heuristic. One probe forward pass (eval mode, ``no_grad``) runs under a
:class:`torch.overrides.TorchFunctionMode` that follows every candidate module M's output through the operations
that keep zeros zero: views, reshapes, permutes, slicing, ``contiguous``, casts, a product with anything (LayerScale,
DropPath), a division of it, dropout, an activation with ``f(0) == 0`` (ReLU, GELU, SiLU, tanh...). M is a residual
branch of its block B when its tracked value reaches exactly one addition (``add``, ``__add__``, ``__radd__``,
``add_``, ``__iadd__``, without ``alpha``) that

- runs in the code of a module holding M (B is the innermost such *block candidate*, see :func:`find_branches`),
- adds a tensor of the result's shape that already existed when M was called and that M's input was computed from
  (the shortcut: the pass's dataflow graph is kept to check it), not a sibling branch computed beside M: RepVGG's
  ``conv(x) + conv1(x)`` is refused both ways,

and is used nowhere else: any other operation on it (a convolution, a norm, a bias add, a concatenation, a second
consumer) refuses M, and so does a tracked value still alive after the forward pass (stored somewhere).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["Branch", "find_branches", "is_inside"]

logger = logging.getLogger(__name__)

# Operations that return (a view or copy of) their first argument's values: zeros stay zeros, and the result holds
# values as old as its input.
_SAME_VALUES = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "t",
        "contiguous",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "__getitem__",
        "narrow",
        "clone",
        "to",
        "float",
        "type_as",
        "dropout",  # eval: the identity; training: a product with a mask
        "dropout1d",
        "dropout2d",
        "dropout3d",
    }
)
_PRODUCTS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"})  # 0 * anything = 0
_QUOTIENTS = frozenset({"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"})  # 0 / y, not y / 0
# Elementwise functions with f(0) == 0 exactly (an activation after the branch's last layer).
_ZERO_AT_ZERO = frozenset({"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "hardswish", "tanh"})
_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
# Reading metadata is no use of the values.
_METADATA = frozenset(
    {
        "size",
        "dim",
        "numel",
        "nelement",
        "ndimension",
        "stride",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "element_size",
        "get_device",
        "data_ptr",
        "storage_offset",
        "__len__",
        "__hash__",
    }
)


@dataclass(frozen=True)
class Branch:
    """A residual branch found by :func:`find_branches`.

    Args:
        name: the branch module (``stages.1.blocks.0.attn``).
        block: the module whose forward adds the branch's output to its shortcut (``stages.1.blocks.0``).
    """

    name: str
    block: str


def is_inside(name: str, ancestor: str) -> bool:
    """True if the module named ``name`` lies inside the module ``ancestor`` (not itself); the root ``""`` holds
    every module."""
    return ancestor == "" or name.startswith(ancestor + ".")


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    """The tensors among ``values``, one level into lists and tuples (``torch.cat([a, b])``, ``x[idx, :]``)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class _Tracker(TorchFunctionMode):
    """Follows candidate outputs through one forward pass and records which reach a residual add (module docs).

    Besides the tags that follow candidate outputs, it keeps the pass's dataflow graph (one node per tensor an
    operation returns, with edges to the nodes of its inputs), so that a shortcut can be checked to be upstream of
    the branch's input.

    Args:
        candidates: modules whose output may be a branch.
        blocks: modules that may hold branches (the *B* of the module docs).
    """

    def __init__(self, candidates: set[str], blocks: set[str]) -> None:
        super().__init__()
        self.candidates, self.blocks = candidates, blocks
        self.step = 0  # a clock: every operation and every module call ticks it
        self.born: dict[int, int] = {}  # id(tensor) -> when its values were computed (absent: before the pass)
        self.node: dict[int, int] = {}  # id(tensor) -> its node in the dataflow graph
        self.parents: list[tuple[int, ...]] = []  # node -> the nodes it was computed from
        self.tags: dict[int, set[str]] = {}  # id(tensor) -> candidates whose output (or a view of it) it carries
        self._refs: dict[int, weakref.ref[torch.Tensor]] = {}  # forget a tensor's entries when it dies
        self.stack: list[str] = []  # modules running now, outermost first
        self.start: dict[str, int] = {}  # candidate -> clock when it was called
        self.input_node: dict[str, int] = {}  # candidate -> node of its input
        self.added: dict[str, str] = {}  # candidate -> the block whose forward added it to a shortcut
        self.rejected: set[str] = set()
        self.carriers: dict[str, list[weakref.ref[torch.Tensor]]] = {}  # candidate -> every tensor that carried it

    # ------------------------------------------------------------------ bookkeeping
    def _watch(self, t: torch.Tensor) -> None:
        key = id(t)
        if key not in self._refs:
            self._refs[key] = weakref.ref(t, lambda _ref, key=key: self._forget(key))

    def _forget(self, key: int) -> None:
        # Runs when the tensor is freed, before its id can be reused by another tensor.
        self.born.pop(key, None)
        self.node.pop(key, None)
        self.tags.pop(key, None)
        self._refs.pop(key, None)

    def _age(self, t: torch.Tensor) -> int:
        return self.born.get(id(t), -1)

    def _node_of(self, t: torch.Tensor) -> int:
        """The node of ``t``; a tensor no operation of the pass returned (an input, a parameter) is a source."""
        node = self.node.get(id(t))
        if node is None:
            node = self._new_node(t, ())
        return node

    def _new_node(self, t: torch.Tensor, parents: tuple[int, ...]) -> int:
        self._watch(t)
        self.node[id(t)] = node = len(self.parents)
        self.parents.append(parents)
        return node

    def _descends(self, node: int, ancestor: int) -> bool:
        """True if ``node`` was computed from ``ancestor`` (or is it)."""
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n == ancestor:
                return True
            if n > ancestor and n not in seen:  # a node's parents are older nodes: nothing below ancestor leads to it
                seen.add(n)
                todo.extend(self.parents[n])
        return False

    def _tag(self, t: torch.Tensor, names: set[str]) -> None:
        names = names - self.rejected
        if not names:
            return
        self._watch(t)
        self.tags.setdefault(id(t), set()).update(names)
        for name in names:
            self.carriers.setdefault(name, []).append(weakref.ref(t))

    def _reject(self, names: Iterable[str]) -> None:
        self.rejected.update(names)

    # ------------------------------------------------------------------ module calls
    def pre_hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called before every module's forward: keep the call stack, note when a candidate starts."""
        self.step += 1
        self.stack.append(name)
        if name not in self.candidates:
            return
        x = next(iter(_tensors((*args, *kwargs.values()))), None)
        if name in self.start or x is None:
            self._reject([name])  # called twice in this pass (skipped in two places), or without a tensor input
            return
        self.start[name] = self.step
        self.input_node[name] = self._node_of(x)

    def post_hook(self, name: str, output: Any) -> None:
        """Called after every module's forward: start following a candidate's output."""
        self.step += 1
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if name not in self.candidates or name in self.rejected:
            return
        if not isinstance(output, torch.Tensor) or self._age(output) < self.start.get(name, self.step):
            self._reject([name])  # not a tensor computed by this call (a tuple, its input, a cached tensor)
            return
        self._tag(output, {name})

    # ------------------------------------------------------------------ operations
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        self.step += 1
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = _tensors((*args, *kwargs.values()))
        tracked = [t for t in inputs if id(t) in self.tags]
        if tracked:
            self._follow(name, args, kwargs, tracked, out)
        self._record(name, args, inputs, out)
        return out

    def _record(self, name: str, args: tuple[Any, ...], inputs: list[torch.Tensor], out: Any) -> None:
        """Add the results to the dataflow graph, and record when their values were computed."""
        outputs = _tensors([out])
        if not outputs:
            return
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if (name in _SAME_VALUES or name == "__get__") and first is not None and len(outputs) == 1:
            if outputs[0] is first:
                return  # ``contiguous()`` of a contiguous tensor, eval dropout: the tensor itself
            age = self._age(first)  # a view or copy holds values as old as its source
        else:
            age = self.step  # new values (an in-place operation renews its target's)
        parents = tuple(self._node_of(t) for t in inputs)
        for t in outputs:
            self._new_node(t, parents)
            if age < 0:
                self.born.pop(id(t), None)
            else:
                self.born[id(t)] = age

    def _follow(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], tracked: list[torch.Tensor], out: Any
    ) -> None:
        """Classify one operation that reads tracked values: carry them on, accept a residual add, or refuse."""
        carried = set().union(*(self.tags[id(t)] for t in tracked))
        if name == "__get__":  # a property: metadata (``shape``, ``dtype``) or a view (``T``, ``mT``)
            if isinstance(out, torch.Tensor):
                self._tag(out, carried)
            return
        if name in _METADATA:
            return
        if "out" in kwargs or not isinstance(out, torch.Tensor):
            self._reject(carried)
            return
        if name in _SAME_VALUES or name in _QUOTIENTS or name in _ZERO_AT_ZERO:
            # Only the first argument may carry a branch: ``x[idx]`` with a tracked index, or ``y / x``, refuse.
            first = args[0] if args else None
            first_tags = self.tags.get(id(first), set()) if isinstance(first, torch.Tensor) else set()
            self._reject(set().union(*(self.tags[id(t)] for t in tracked if t is not first)))
            self._tag(out, first_tags)
        elif name in _PRODUCTS:
            self._tag(out, carried)
        elif name in _ADDS and len(args) == 2 and not kwargs:  # ``alpha=`` would scale the shortcut
            self._add(args[0], args[1], out)
        else:
            self._reject(carried)

    def _add(self, a: Any, b: Any, out: torch.Tensor) -> None:
        """An addition of tracked values: a residual add for the candidates whose shortcut qualifies.

        Runs before the results are recorded, so the graph and ages are those of the operands.
        """
        a_tags = self.tags.get(id(a), set()) if isinstance(a, torch.Tensor) else set()
        b_tags = self.tags.get(id(b), set()) if isinstance(b, torch.Tensor) else set()
        for name, other in [(n, b) for n in a_tags] + [(n, a) for n in b_tags]:
            if name in self.rejected:
                continue
            block = self._holder(name)
            ok = (
                block is not None
                and name not in self.added
                and not (name in a_tags and name in b_tags)
                and isinstance(other, torch.Tensor)
                and other.shape == out.shape
                and self._age(other) < self.start[name]
                # the shortcut is upstream of the branch's input, not a sibling computed beside it
                and id(other) in self.node
                and self._descends(self.input_node[name], self.node[id(other)])
            )
            if ok:
                self.added[name] = block  # type: ignore[assignment]
            else:
                self._reject([name])
        if out is a or out is b:  # in place: the target now holds the sum, no branch's output any more
            self.tags.pop(id(out), None)

    def _holder(self, name: str) -> str | None:
        """The block whose code runs the add: the innermost running block candidate that holds ``name``."""
        if not self.stack or not is_inside(name, self.stack[-1]):
            return None  # the add runs outside the code of the modules that hold the candidate
        return next((m for m in reversed(self.stack) if m in self.blocks and is_inside(name, m)), None)

    def result(self) -> dict[str, str]:
        """Candidate -> block, for the candidates that passed (call once, after the forward pass)."""
        alive = {n for n, refs in self.carriers.items() if any(r() is not None for r in refs)}
        passed = {n: b for n, b in self.added.items() if n not in self.rejected and n not in alive}
        # Drop the weak references: their callbacks point back here, a cycle the garbage collector would wait on.
        self._refs.clear()
        self.carriers.clear()
        self.born.clear()
        self.node.clear()
        self.tags.clear()
        return passed


def find_branches(
    model: nn.Module, example_input: torch.Tensor, candidates: set[str], blocks: set[str]
) -> list[Branch]:
    """The residual branches among ``candidates`` (module docs), found in one forward pass of ``model``.

    Args:
        model: the model, in eval mode (discovery's caller sets it).
        example_input: a batch the model accepts.
        candidates: names of modules that may be branches: with parameters, called once, returning a tensor of
            their input's shape.
        blocks: names of modules that may hold branches (a branch's block is the innermost of these that holds it
            and runs the add).

    Returns:
        Every candidate that passes, nested ones included (the caller keeps the outermost), in no order. A model
        whose probe fails (an exotic op the mode cannot follow) has none: discovery then gates whole blocks only.
    """
    if not candidates:
        return []
    tracker = _Tracker(candidates, blocks)
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(_pre(tracker, name), with_kwargs=True))
        handles.append(module.register_forward_hook(_post(tracker, name)))
    try:
        with torch.no_grad(), tracker:
            model(example_input)
    except Exception as e:  # the first probe ran this input fine: the mode itself failed; gate no branches
        logger.info("the residual-branch probe of %s failed (%s): no branches gated", type(model).__name__, e)
        return []
    finally:
        for handle in handles:
            handle.remove()
    return [Branch(name, block) for name, block in tracker.result().items()]


def _pre(tracker: _Tracker, name: str) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tracker.pre_hook(name, args, kwargs)

    return hook


def _post(tracker: _Tracker, name: str) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        tracker.post_hook(name, output)

    return hook
