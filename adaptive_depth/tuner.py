"""``DepthTuner``: depth gates injected into a base model, depth switching, per-depth norms and costs.

This is the "tuner" half of :class:`~adaptive_depth.AdaptiveDepth` (PEFT's split: the tuner injects and switches,
the public model class adds loading, saving, pushing and the model card). Everything here works on a model in
memory; nothing touches files or the Hub.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .budget import LatencyProfile, choose_scaling_factor, profile_model
from .config import AdaptiveDepthConfig, StageSpec
from .errors import ConfigError, DepthSpecError
from .export import export_matching
from .flops import count_flops
from .gates import DepthGate, check_structure, gate_model
from .norms import (
    DepthNorms,
    recalibrate_depths,
    register_training_statistics_hooks,
)
from .policy import active_mask, check_scaling_factor, depth_key, keep_count
from .state import preserved
from .summary import depth_summary

__all__ = ["DepthTuner"]

logger = logging.getLogger(__name__)


class DepthTuner(nn.Module):
    """A base model with depth gates on its residual blocks, and the controls of its depth.

    Args:
        model: the base model; its gateable blocks are wrapped in place.
        config: stages, policy and metadata (from discovery or a saved ``config.json``).

    Thread safety: the depth is state of the model. :meth:`scaled` (and every method that visits other depths
    and comes back: :meth:`flops`, :meth:`profile`, :meth:`export`, :meth:`recalibrate_norms`) holds a lock, so
    threads that use ``with model.scaled(s): model(x)`` get their own depth, one thread at a time. Reading the model
    whole holds the same lock: ``state_dict()``, ``load_state_dict()``, ``copy.deepcopy(model)`` and
    ``save_pretrained()`` wait for a thread inside ``scaled()`` and see the model at its own depth, never one half
    switched. Plain :meth:`set_scaling_factor` followed by a call is not safe across threads: give each thread its
    own copy (``copy.deepcopy(model)``) to serve depths in parallel.
    """

    def __init__(self, model: nn.Module, config: AdaptiveDepthConfig) -> None:
        super().__init__()
        check_structure(model, config)
        self.model = model
        self.config = config
        gates = gate_model(model, [b for s in config.stages for b in s.blocks])
        # Plain lists (not a ModuleList): the gates are already registered inside ``model``.
        self._stage_gates: list[list[DepthGate | None]] = [[gates.get(b.name) for b in s.blocks] for s in config.stages]
        self._switches: dict[tuple[int, ...], list[tuple[DepthGate, bool]]] = {}  # gate states per depth
        self._depths: dict[float, list[int]] = {}  # blocks per stage per scaling factor
        self._scaling_factor: float | None = 1.0
        self._norms_key: tuple[int, ...] | None = None  # whose BatchNorm statistics run: blocks per stage, or default
        self._lock = threading.RLock()
        self.depth_norms: DepthNorms | None = None  # per-depth BatchNorm statistics, after recalibration
        self.image_processor: Any = None  # a transformers base's image processor (saved and loaded with the model)
        # state_dict() holds the statistics of training whatever the depth, and load_state_dict() writes them.
        register_training_statistics_hooks(self)
        self.set_scaling_factor(config.default_scaling_factor)

    # ------------------------------------------------------------------ pickling (the lock cannot be copied)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> DepthTuner:
        # Under the depth lock: a thread inside scaled() has switched gates and statistics for a while, and a copy
        # taken then would keep that depth's statistics with another depth's gates.
        with self._lock:
            copied = type(self).__new__(type(self))
            memo[id(self)] = copied
            copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
            return copied

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's state (training statistics whatever the depth), read under the depth lock."""
        with self._lock:
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights and training statistics (see ``torch.nn.Module.load_state_dict``) under the depth lock."""
        with self._lock:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ depth
    @property
    def stages(self) -> list[StageSpec]:
        """The stages found by discovery, in execution order."""
        return self.config.stages

    @property
    def scaling_factor(self) -> float | None:
        """The current scaling factor, or ``None`` after an explicit :meth:`set_depth` or :meth:`drop_blocks`."""
        return self._scaling_factor

    @property
    def active_depth(self) -> list[int]:
        """Blocks per stage that run now (fixed blocks included)."""
        return [sum(1 for g in gates if g is None or g.active) for gates in self._stage_gates]

    def depth_for(self, scaling_factor: float) -> list[int]:
        """Blocks per stage that run at ``scaling_factor``."""
        # Only exact floats hit the cache: True == 1.0 and unhashable values must reach the validation.
        counts = self._depths.get(scaling_factor) if type(scaling_factor) is float else None
        if counts is None:
            s = check_scaling_factor(scaling_factor)
            counts = [keep_count(s, st.num_blocks, st.num_fixed) for st in self.stages]
            self._depths[s] = counts
            if type(scaling_factor) is float:
                self._depths[scaling_factor] = counts
        return list(counts)

    def set_scaling_factor(self, scaling_factor: float) -> DepthTuner:
        """Run about ``scaling_factor`` of each stage's blocks (``1.0``: the full network). Returns ``self``."""
        counts = self.depth_for(scaling_factor)
        self._activate(counts, check_scaling_factor(scaling_factor))
        return self

    def set_depth(self, blocks_per_stage: Sequence[int]) -> DepthTuner:
        """Run exactly ``blocks_per_stage[i]`` blocks (fixed ones included) in stage ``i``. Returns ``self``."""
        counts = self._check_depth(blocks_per_stage)
        self._activate(counts, 1.0 if counts == [st.num_blocks for st in self.stages] else None)
        return self

    def drop_blocks(self, probability: float, generator: torch.Generator | None = None) -> DepthTuner:
        """LayerDrop-style random depth: skip each gateable block with ``probability``. Returns ``self``.

        For training (the random-depth baseline); at least one block of every stage runs. Draws from torch's
        random number generator (or ``generator``), so seeding and checkpointed RNG states reproduce it. The model
        runs with the BatchNorm statistics of training, like a depth that was never recalibrated.
        """
        if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0 <= probability < 1:
            raise ConfigError(f"drop probability must be in [0, 1), got {probability!r}")
        self._scaling_factor, self._norms_key = None, None
        if self.depth_norms is not None:
            self.depth_norms.use(None)
        for stage, gates in zip(self.stages, self._stage_gates):
            keep = (torch.rand(len(gates), generator=generator) >= probability).tolist()
            if stage.num_fixed == 0 and not any(keep):
                keep[0] = True  # a stage of gateable blocks only keeps its first one
            for gate, on in zip(gates, keep):
                if gate is not None:
                    gate.switch(on)
        return self

    def _check_depth(self, blocks_per_stage: Sequence[int]) -> list[int]:
        limits = [(max(1, st.num_fixed), st.num_blocks) for st in self.stages]
        if isinstance(blocks_per_stage, str | bytes) or not isinstance(blocks_per_stage, Sequence):
            raise DepthSpecError(
                f"set_depth() takes one block count per stage ({len(limits)} stages), got {blocks_per_stage!r}"
            )
        if len(blocks_per_stage) != len(limits):
            raise DepthSpecError(
                f"set_depth() got {len(blocks_per_stage)} counts for {len(limits)} stages "
                f"({[st.name for st in self.stages]}); pass one count per stage, e.g. {[hi for _, hi in limits]}"
            )
        counts = []
        for stage, value, (lo, hi) in zip(self.stages, blocks_per_stage, limits):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
                raise DepthSpecError(
                    f"stage {stage.name!r} can run {lo}..{hi} blocks, got {value!r}; "
                    f"allowed counts per stage: {[f'{a}..{b}' for a, b in limits]}"
                )
            counts.append(int(value))
        return counts

    def _activate(self, counts: list[int], scaling_factor: float | None) -> None:
        """Switch the gates to ``counts`` blocks per stage, and the BatchNorm statistics to that depth's."""
        key = tuple(counts)
        self._scaling_factor, self._norms_key = scaling_factor, key
        if self.depth_norms is not None:
            self.depth_norms.use(key)  # any s (or explicit depth) that runs these blocks shares their statistics
        switches = self._switches.get(key)
        if switches is None:
            switches = self._switches[key] = [
                (gate, on)
                for gates, mask in zip(self._stage_gates, self._masks_for(counts))
                for gate, on in zip(gates, mask)
                if gate is not None
            ]
        for gate, on in switches:
            gate.switch(on)

    def _masks_for(self, counts: list[int]) -> list[list[bool]]:
        return [active_mask(st.gateable, k, self.config.policy) for st, k in zip(self.stages, counts)]

    def snapshot_depth(self) -> Callable[[], None]:
        """Remember the current depth; the returned callable switches back to it (see :func:`preserved`)."""
        s, norms_key = self._scaling_factor, self._norms_key
        states = [(gate, gate.active) for gates in self._stage_gates for gate in gates if gate is not None]

        def restore() -> None:
            self._scaling_factor, self._norms_key = s, norms_key
            for gate, on in states:  # gate by gate: a random depth (drop_blocks) is not described by its counts
                gate.switch(on)
            if self.depth_norms is not None:
                self.depth_norms.use(norms_key)

        return restore

    def depth_lock(self) -> contextlib.AbstractContextManager[object]:
        """The re-entrant lock held inside :meth:`scaled` and every method that visits other depths."""
        return self._lock

    @contextlib.contextmanager
    def scaled(self, scaling_factor: float) -> Iterator[DepthTuner]:
        """Context manager: run at ``scaling_factor`` inside the block, restore the previous depth after.

        Holds the model's depth lock for the block, so threads that each use ``scaled`` do not mix depths.
        """
        with preserved(self):
            self.set_scaling_factor(scaling_factor)
            yield self

    # ------------------------------------------------------------------ per-depth normalisation
    def recalibrate_norms(
        self,
        batches: Iterable[Any],
        scaling_factors: Sequence[float] | None = None,
        *,
        max_batches: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[float, int]:
        """Re-estimate BatchNorm running statistics at every trained depth and keep one set per depth.

        Skipping blocks changes what later BatchNorm layers see; after this, :meth:`set_scaling_factor` swaps
        in the statistics of the chosen depth (by reference, no copy) and ``save_pretrained`` saves them. Any
        scaling factor or :meth:`set_depth` that runs the same blocks as a recalibrated depth uses its statistics;
        other depths use the statistics the model was trained with.

        Args:
            batches: a re-iterable of image batches, or of ``(images, labels)`` (a ``DataLoader`` of training
                data), read once per depth, without augmentation ideally.
            scaling_factors: the depths to recalibrate (default: ``config.scaling_factors``).
            max_batches: read at most this many batches per depth.
            reduce: applied to every statistic at the end (e.g. a mean over processes).

        Returns:
            The number of images read at each depth. A model without BatchNorm is left unchanged (``{}``).
        """
        factors = [check_scaling_factor(s) for s in (scaling_factors or self.config.scaling_factors)]
        return recalibrate_depths(self, batches, factors, max_batches=max_batches, reduce=reduce)

    def reset_norms(self) -> None:
        """Forget the per-depth statistics: every depth runs with the statistics of training again.

        For a model that is trained further (its per-depth sets would be stale afterwards); recalibrate after.
        """
        if self.depth_norms is not None:
            self.depth_norms.use(None)
            self.depth_norms = None
        self.config.norm_stats = []

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model at the current depth (same signature and output)."""
        return self.model(*args, **kwargs)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A random batch of the configured input size, on the model's device and dtype."""
        param = next(self.model.parameters())
        x = torch.randn(batch_size, *self.config.input_size, generator=torch.Generator().manual_seed(0))
        return x.to(device=param.device, dtype=param.dtype)

    # ------------------------------------------------------------------ costs
    def flops(self, scaling_factor: float | None = None) -> int:
        """FLOPs of one forward pass on one ``input_size`` image, at ``scaling_factor`` (default: current)."""
        if scaling_factor is None:
            return count_flops(self.model, self.example_input())
        with self.scaled(scaling_factor):
            return count_flops(self.model, self.example_input())

    def flops_table(self) -> dict[float, int]:
        """FLOPs at every trained scaling factor (cached in ``config.flops``)."""
        return {s: self._cached_flops(s) for s in self.config.scaling_factors}

    def _cached_flops(self, scaling_factor: float) -> int:
        """FLOPs at one depth, counted once and kept in ``config.flops`` (saved with the model)."""
        key = depth_key(scaling_factor)
        cache = self.config.current_flops()  # emptied if counted at another input size
        if key not in cache:
            cache[key] = self.flops(scaling_factor)
        return int(cache[key])

    def fewest_blocks_flops_ratio(self) -> float:
        """FLOPs with the fewest blocks that can run (every gateable block off but one per stage) over s = 1.

        ``1 - ratio`` is the most any depth can save: small when the gateable blocks hold little of the compute.
        """
        full = self._cached_flops(1.0)  # only the full depth: wrap() asks for this ratio, each depth costs a pass
        with preserved(self):
            self.set_depth([max(1, st.num_fixed) for st in self.stages])
            return count_flops(self.model, self.example_input()) / full

    def depth_summary(self) -> str:
        """A table of stages and blocks, and the blocks and FLOPs at each trained scaling factor.

        The ``gates`` column says whether a stage gates whole blocks or residual branches inside its blocks (then
        ``blocks`` counts branches: TinyViT's ``attn`` and ``mlp`` of every block).
        """
        return depth_summary(self)

    def profile(
        self,
        example_input: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        *,
        batch_size: int | Sequence[int] | None = None,
        scaling_factors: Sequence[float] | None = None,
        warmup: int = 5,
        repeats: int = 20,
    ) -> dict[float, float]:
        """Measure the latency of every trained depth on ``device`` and keep it (saved in ``config.json``).

        Run it on the device you deploy to; :meth:`set_budget` then picks depths by measured milliseconds, and the
        serving controller (:class:`~adaptive_depth.serving.DepthController`) predicts batches from it. Every depth
        and batch size is timed in interleaved rounds, so a slow spell of the machine touches all alike.

        Args:
            example_input: images like the ones you serve (default: random ``input_size`` images).
            device: where to measure; the model is moved there and stays (default: where it is).
            batch_size: images per forward pass, or several (``(1, 4, 16)``: one row each, for a server that
                batches); the example's images are repeated or cut to each size. Default: the example's own batch,
                or 1.
            scaling_factors: the depths to measure (default: the trained ones).
            warmup, repeats: rounds discarded, then rounds whose median is kept.

        Returns:
            Milliseconds per forward pass at each depth, at the smallest batch size (:attr:`latency_profile` holds
            every batch size).

        Raises:
            ConfigError: a batch size that is not a positive integer.
        """
        if device is not None:
            self.to(device)
        depths = [check_scaling_factor(s) for s in scaling_factors or self.config.scaling_factors]
        profile = profile_model(self, example_input, batch_size, depths, warmup=warmup, repeats=repeats)
        self.config.latency_profile = profile.to_dict()
        return {s: ms for s in depths if (ms := profile.at(s)) is not None}

    @property
    def latency_profile(self) -> LatencyProfile | None:
        """The latencies measured by :meth:`profile` (or loaded with the model), if any."""
        data = self.config.latency_profile
        return LatencyProfile.from_dict(data) if data is not None else None

    def set_budget(
        self, *, max_flops: float | None = None, max_latency_ms: float | None = None, batch_size: int | None = None
    ) -> float:
        """Run at the largest trained depth that fits the budget; returns the scaling factor picked.

        Args:
            max_flops: the most FLOPs per image (at ``config.input_size``, as in :meth:`flops_table`).
            max_latency_ms: the most milliseconds per forward pass, as measured by :meth:`profile` on the device
                the model is on now.
            batch_size: the batch size ``max_latency_ms`` is for (default: the smallest profiled).

        Raises:
            BudgetError: no trained depth fits, a latency budget without a profile, or with a profile measured on
                another device (or thread count, or dtype) than the model's.
        """
        flops = self.flops_table()
        profile = self.latency_profile
        if max_latency_ms is not None and profile is not None:
            param = next(self.model.parameters())
            profile.check_device(param.device, param.dtype)
        latency = {s: ms for s in flops if profile is not None and (ms := profile.at(s, batch_size)) is not None}
        s = choose_scaling_factor(flops, latency, max_flops=max_flops, max_latency_ms=max_latency_ms)
        self.set_scaling_factor(s)
        measured = f", {latency[s]:.3g} ms on {profile.device}" if s in latency and profile is not None else ""
        logger.info("budget: running at s=%g (%.4g GFLOPs%s)", s, flops[s] / 1e9, measured)
        return s

    # ------------------------------------------------------------------ export
    def resolve_depth(
        self, scaling_factor: float | None = None, depth: Sequence[int] | None = None
    ) -> tuple[list[int], float | None]:
        """Blocks per stage and scaling factor named by ``depth``, else ``scaling_factor``, else the current depth."""
        if depth is not None:
            return self._check_depth(depth), None
        if scaling_factor is not None:
            return self.depth_for(scaling_factor), check_scaling_factor(scaling_factor)
        return self.active_depth, self._scaling_factor

    def export(self, scaling_factor: float | None = None, *, depth: Sequence[int] | None = None) -> nn.Module:
        """A plain timm / transformers module of one depth, with the skipped blocks removed.

        The copy holds that depth's BatchNorm statistics, and is checked to compute what this model computes at that
        depth. Where deleting blocks would change that (a forward that counts its blocks, as ConViT's), each removed
        block's place holds a pass-through instead.

        Args:
            scaling_factor: the depth to export (default: the current one).
            depth: explicit blocks per stage instead of a scaling factor.
        """
        return self.export_checked(scaling_factor, depth=depth)[0]

    def export_checked(
        self, scaling_factor: float | None = None, *, depth: Sequence[int] | None = None
    ) -> tuple[nn.Module, bool]:
        """:meth:`export`, and whether the removed blocks kept their places (see :func:`export_matching`)."""
        counts, s = self.resolve_depth(scaling_factor, depth)
        with preserved(self):
            self._activate(counts, s)  # the BatchNorm statistics of that depth go into the copy
            return export_matching(self.model, self.stages, self._masks_for(counts), self.example_input(2))
