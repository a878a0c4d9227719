"""Depth policies: which blocks of a stage stay on for a scaling factor.

A stage has ``n`` blocks, ``f`` of them fixed (shape-changing, always on). For a scaling factor ``s`` the
stage keeps ``k = max(1, f, ceil(s * n))`` blocks (docs/concepts.md); the policy decides which gateable
blocks make up the rest:

* ``"last"`` (default): keep blocks from the start of the stage, switch off from the end.
* ``"spread"``: keep evenly spaced gateable blocks (every other block at ``s = 0.5``), as LayerDrop and
  DynaBERT prune transformers.

A stage that gates residual branches instead of blocks (TinyViT's ``attn`` and ``mlp``) counts its branches
exactly as blocks: ``n`` is the number of branches.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .errors import ScalingFactorError

__all__ = ["POLICIES", "active_mask", "check_scaling_factor", "depth_key", "keep_count"]

POLICIES = ("last", "spread")

# Guard against float noise such as 0.1 * 10 = 1.0000000000000002 turning ceil(s * n) one block too high.
_EPS = 1e-9
# Scaling factors are canonical to this many significant digits, so that 0.2 * 3, np.float32(0.6) and
# torch.tensor(0.6).item() all name the depth 0.6 (and find its BatchNorm statistics, FLOPs and latency).
_DIGITS = 6


def check_scaling_factor(value: object) -> float:
    """Return ``value`` as a canonical float if it is a real number in (0, 1], else raise :class:`ScalingFactorError`.

    Canonical: rounded to 6 significant digits, so float noise (``0.2 * 3``, ``np.float32(0.6)``) gives the same
    depth as the literal (``0.6``). Every scaling factor the library stores or compares goes through here.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ScalingFactorError(
            f"scaling factor must be a number in (0, 1], got {value!r} of type {type(value).__name__}; "
            "pass e.g. 0.5 to run about half of the skippable blocks of every stage"
        )
    s = float(value)
    if not (0.0 < s <= 1.0) or math.isnan(s):
        raise ScalingFactorError(
            f"scaling factor must be in (0, 1], got {value!r}; 1.0 is the full network, "
            "0.25 runs about a quarter of each stage's blocks"
        )
    return float(f"{s:.{_DIGITS}g}")


def depth_key(scaling_factor: object) -> str:
    """The one string form of a scaling factor (``"0.5"``, ``"1.0"``): keys of FLOPs, latencies and statistics."""
    return str(check_scaling_factor(scaling_factor))


def keep_count(s: float, n: int, f: int) -> int:
    """Number of blocks a stage of ``n`` blocks, ``f`` of them fixed, keeps at scaling factor ``s``."""
    return min(n, max(1, f, math.ceil(s * n - _EPS)))


def active_mask(gateable: Sequence[bool], k: int, policy: str = "last") -> list[bool]:
    """Which blocks run when a stage keeps ``k`` blocks.

    Args:
        gateable: one flag per block of the stage, in execution order; fixed blocks are always on.
        k: number of blocks to keep, fixed ones included (``f <= k <= n``).
        policy: ``"last"`` or ``"spread"``.
    """
    n = len(gateable)
    fixed = n - sum(gateable)
    if not fixed <= k <= n:
        raise ValueError(f"a stage of {n} blocks with {fixed} fixed can keep {fixed}..{n} blocks, got {k}")
    if policy not in POLICIES:
        raise ValueError(f"unknown depth policy {policy!r}; choose one of {POLICIES}")
    gate_positions = [i for i, g in enumerate(gateable) if g]
    keep_gated = k - fixed
    if policy == "last":
        kept = set(gate_positions[:keep_gated])
    else:
        m = len(gate_positions)
        kept = {gate_positions[(i * m) // keep_gated] for i in range(keep_gated)} if keep_gated else set()
    return [(not g) or (i in kept) for i, g in enumerate(gateable)]
