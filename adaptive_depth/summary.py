"""The text ``DepthTuner.depth_summary()`` prints: stages and blocks, blocks and FLOPs at each trained depth."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import GATE_LABELS

if TYPE_CHECKING:
    from .tuner import DepthTuner

__all__ = ["depth_summary"]


def depth_summary(model: DepthTuner) -> str:
    """A table of stages and blocks, and the blocks and FLOPs at each trained scaling factor (see
    :meth:`DepthTuner.depth_summary`)."""
    lines = [
        f"{type(model.model).__name__}: {len(model.stages)} stages, discovery: {model.config.discovery}, "
        f"policy: {model.config.policy}, input {tuple(model.config.input_size)}",
        "",
        f"{'stage':<40} {'gates':>8} {'blocks':>6} {'fixed':>5} {'gateable':>8}",
    ]
    for st in model.stages:
        gates = GATE_LABELS[st.kind]
        lines.append(f"{st.name:<40} {gates:>8} {st.num_blocks:>6} {st.num_fixed:>5} {st.num_blocks - st.num_fixed:>8}")
    lines.append("")
    table = model.flops_table()
    full = table.get(1.0) or model.flops(1.0)
    lines.append(f"{'s':>6} {'blocks per stage':<30} {'GFLOPs':>9} {'vs s=1':>7}")
    for s, flops in table.items():
        lines.append(f"{s:>6.3g} {model.depth_for(s)!s:<30} {flops / 1e9:>9.4f} {flops / full:>7.3f}")
    ratio = model.fewest_blocks_flops_ratio()
    lines.append(f"the fewest blocks run {ratio:.3f} of the s=1 FLOPs: at most {1 - ratio:.0%} can be saved")
    current = "custom" if model.scaling_factor is None else f"{model.scaling_factor:g}"
    lines.append(f"\ncurrent: s = {current}, blocks per stage {model.active_depth}")
    return "\n".join(lines)
