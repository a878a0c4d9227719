"""``AdaptiveDepth``: a timm / transformers vision model whose depth can be switched at inference time."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .budget import LatencyProfile, choose_scaling_factor, describe_device
from .card import CARD_MARKER, build_model_card
from .config import AdaptiveDepthConfig, BaseModelRef, StageSpec
from .discovery import discover
from .errors import CheckpointError, ConfigError, DepthSpecError, WeightsUnavailableError
from .export import export_depth
from .flops import count_flops
from .gates import DepthGate, gate_model
from .latency import measure_latencies_ms
from .loading import (
    CONFIG_NAME,
    HubOptions,
    Resolved,
    describe_base_model,
    load_base_model,
    rebuild_base_model,
    resolve,
)
from .norms import DepthNorms, batchnorm_layers, recalibrate_batchnorm
from .policy import active_mask, check_scaling_factor, keep_count
from .report import PLOT_NAME, pareto_plot

__all__ = ["AdaptiveDepth"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
NORMS_NAME = "depth_norms.safetensors"


def _default_input_size(model: nn.Module) -> list[int]:
    """``[C, H, W]`` the model expects, from what it says about itself (timm data config, transformers config)."""
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        import timm.data

        return list(timm.data.resolve_model_data_config(model)["input_size"])
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
        return [int(getattr(config, "num_channels", 3)), int(h), int(w)]
    return [3, 224, 224]


class AdaptiveDepth(
    nn.Module,
    ModelHubMixin,
    library_name="adaptive-depth",
    tags=["adaptive-depth", "image-classification"],
    pipeline_tag="image-classification",
):
    """A vision model with depth gates on its residual blocks.

    Build one with :meth:`from_pretrained` (timm name, Hub id, local folder, or a saved adaptive-depth
    model) or :meth:`wrap` (a module you built). The call signature and output type are those of the
    wrapped model; :meth:`set_scaling_factor` / :meth:`set_depth` choose how many blocks run.

    Args:
        model: the base model; its gateable blocks are wrapped in place.
        config: stages, policy and metadata (from discovery or a saved ``config.json``).
    """

    def __init__(self, model: nn.Module, config: AdaptiveDepthConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        modules = dict(model.named_modules())
        missing = [b.name for s in config.stages for b in s.blocks if b.name not in modules]
        if missing:
            raise CheckpointError(
                f"the config names blocks {missing[:5]} that {type(model).__name__} does not have; "
                "the config belongs to another architecture"
            )
        gates = gate_model(model, [b for s in config.stages for b in s.blocks])
        # Plain lists (not a ModuleList): the gates are already registered inside ``model``.
        self._stage_gates: list[list[DepthGate | None]] = [[gates.get(b.name) for b in s.blocks] for s in config.stages]
        self._switches: dict[tuple[int, ...], list[tuple[DepthGate, bool]]] = {}  # gate states per depth
        self._depths: dict[float, list[int]] = {}  # blocks per stage per scaling factor
        self._scaling_factor: float | None = 1.0
        self.depth_norms: DepthNorms | None = None  # per-depth BatchNorm statistics, after recalibration
        self.set_scaling_factor(config.default_scaling_factor)

    # ------------------------------------------------------------------ building
    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        *,
        policy: str = "last",
        scaling_factors: Sequence[float] | None = None,
        block_patterns: Sequence[str] | None = None,
        example_input: torch.Tensor | None = None,
        input_size: Sequence[int] | None = None,
        base_model: BaseModelRef | None = None,
    ) -> AdaptiveDepth:
        """Make an already built model depth-switchable.

        Args:
            model: a timm model, a transformers model, or any ``nn.Module`` taking an image batch.
            policy: ``"last"`` (switch blocks off from the end of each stage) or ``"spread"`` (keep evenly
                spaced blocks).
            scaling_factors: depths to train and report (default 0.25, 0.5, 0.75, 1.0).
            block_patterns: regexes on module names that name the blocks, overriding discovery.
            example_input: a batch the model accepts, used to probe it; default: random, ``input_size``.
            input_size: ``[C, H, W]``; default: what the model declares (timm data config,
                transformers ``image_size``), else ``[3, 224, 224]``.
            base_model: how to rebuild the architecture (filled in by :meth:`from_pretrained`).
        """
        if not isinstance(model, nn.Module):
            raise ConfigError(f"wrap() needs a torch.nn.Module, got {type(model).__name__}")
        if example_input is None:
            size = list(input_size) if input_size is not None else _default_input_size(model)
            example_input = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
            param = next(model.parameters(), None)
            if param is not None:
                example_input = example_input.to(device=param.device, dtype=param.dtype)
        found = discover(model, example_input, block_patterns)
        config_kwargs: dict[str, Any] = {}
        if scaling_factors is not None:
            config_kwargs["scaling_factors"] = list(scaling_factors)
        config = AdaptiveDepthConfig(
            base_model=base_model or describe_base_model(model),
            stages=found.stages,
            policy=policy,
            input_size=list(example_input.shape[1:]),
            discovery=found.method,
            **config_kwargs,
        )
        logger.info(
            "found %d gateable blocks in %d stages (%s)",
            config.num_gateable,
            len(config.stages),
            found.method,
        )
        return cls(model, config)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        pretrained: bool = True,
        num_classes: int | None = None,
        model: nn.Module | None = None,
        policy: str = "last",
        scaling_factors: Sequence[float] | None = None,
        block_patterns: Sequence[str] | None = None,
        input_size: Sequence[int] | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **model_kwargs: Any,
    ) -> AdaptiveDepth:
        """Load a saved adaptive-depth model, or wrap a timm / transformers model.

        Args:
            pretrained_model_name_or_path: a timm name (``"resnet50"``, ``"resnet50.a1_in1k"``), a timm Hub id
                (``"timm/convnext_atto.d2_in1k"``, ``"hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"``), a
                transformers Hub id (``"microsoft/resnet-50"``), a local folder of any of these, or a repo /
                folder written by :meth:`save_pretrained`.
            pretrained: load the base model's pretrained weights (default). Missing weights are an error;
                pass ``False`` for random initialisation.
            num_classes: replace the classifier with a fresh one for this many classes.
            model: for a saved model that wraps a custom module: an instance of that module.
            policy, scaling_factors, block_patterns, input_size: see :meth:`wrap` (new wraps only).
            revision, cache_dir, token, local_files_only, force_download: Hub download options.
            **model_kwargs: passed to ``timm.create_model`` or the transformers config (e.g. ``drop_path_rate``).
        """
        hub = HubOptions(revision, cache_dir, token, local_files_only, force_download)
        resolved = resolve(pretrained_model_name_or_path, hub)
        if resolved.kind == "adaptive":
            if num_classes is not None or model_kwargs:
                raise ConfigError(
                    f"{pretrained_model_name_or_path!s} is a saved adaptive-depth model; it cannot be rebuilt with "
                    f"num_classes / {sorted(model_kwargs)}. Fine-tune it to change its head"
                )
            return cls._load_saved(resolved, hub, model)
        if model is not None:
            raise ConfigError("model= is only for loading a saved adaptive-depth model that wraps a custom module")
        if "img_size" in model_kwargs and input_size is None:
            size = model_kwargs["img_size"]
            h, w = (size, size) if isinstance(size, int) else size
            input_size = [int(model_kwargs.get("in_chans", 3)), h, w]
        base, ref = load_base_model(
            resolved, pretrained=pretrained, num_classes=num_classes, model_kwargs=model_kwargs, hub=hub
        )
        return cls.wrap(
            base,
            policy=policy,
            scaling_factors=scaling_factors,
            block_patterns=block_patterns,
            input_size=input_size,
            base_model=ref,
        )

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        model: nn.Module | None = None,
        **_: Any,
    ) -> AdaptiveDepth:
        """``ModelHubMixin`` hook: load a saved adaptive-depth repo."""
        hub = HubOptions(revision, cache_dir, token, local_files_only, force_download)
        resolved = resolve(model_id, hub)
        if resolved.kind != "adaptive":
            raise CheckpointError(f"{model_id!r} is a {resolved.kind} model, not a saved adaptive-depth model")
        return cls._load_saved(resolved, hub, model)

    @classmethod
    def _load_saved(cls, resolved: Resolved, hub: HubOptions, model: nn.Module | None) -> AdaptiveDepth:
        config = AdaptiveDepthConfig.from_dict(resolved.config or {})
        weights = _fetch(resolved, WEIGHTS_NAME, hub)
        instance = cls(rebuild_base_model(config.base_model, model), config)
        try:
            load_model(instance.model, weights, strict=True, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{weights} is not a valid safetensors file ({e}); save or download it again") from e
        except RuntimeError as e:
            raise CheckpointError(
                f"the weights in {weights} do not match the {config.base_model.architecture} architecture of "
                f"its config.json: {str(e)[:1500]}"
            ) from e
        if config.norm_stats:
            path = _fetch(resolved, NORMS_NAME, hub)
            try:
                tensors = load_file(path, device="cpu")
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a valid safetensors file ({e}); save it again") from e
            instance.depth_norms = DepthNorms(batchnorm_layers(instance.model))
            instance.depth_norms.load_tensors(tensors, config.norm_stats, path)
            instance.set_scaling_factor(config.default_scaling_factor)
        return instance.eval()

    # ------------------------------------------------------------------ depth
    @property
    def stages(self) -> list[StageSpec]:
        """The stages found by discovery, in execution order."""
        return self.config.stages

    @property
    def scaling_factor(self) -> float | None:
        """The current scaling factor, or ``None`` after an explicit :meth:`set_depth`."""
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
            counts = self._depths[s] = [keep_count(s, st.num_blocks, st.num_fixed) for st in self.stages]
        return list(counts)

    def set_scaling_factor(self, scaling_factor: float) -> AdaptiveDepth:
        """Run about ``scaling_factor`` of each stage's blocks (``1.0``: the full network). Returns ``self``."""
        counts = self.depth_for(scaling_factor)
        self._activate(counts, float(scaling_factor))
        return self

    def set_depth(self, blocks_per_stage: Sequence[int]) -> AdaptiveDepth:
        """Run exactly ``blocks_per_stage[i]`` blocks (fixed ones included) in stage ``i``. Returns ``self``."""
        counts = self._check_depth(blocks_per_stage)
        self._activate(counts, 1.0 if counts == [st.num_blocks for st in self.stages] else None)
        return self

    def drop_blocks(self, probability: float, generator: torch.Generator | None = None) -> AdaptiveDepth:
        """LayerDrop-style random depth: skip each gateable block with ``probability``. Returns ``self``.

        For training (the random-depth baseline); at least one block of every stage runs. Draws from torch's
        random number generator (or ``generator``), so seeding and checkpointed RNG states reproduce it. The model
        runs with the BatchNorm statistics of training, like after a custom :meth:`set_depth`.
        """
        if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0 <= probability < 1:
            raise ConfigError(f"drop probability must be in [0, 1), got {probability!r}")
        self._scaling_factor = None
        if self.depth_norms is not None:
            self.depth_norms.use(None)
        for stage, gates in zip(self.stages, self._stage_gates):
            keep = (torch.rand(len(gates), generator=generator) >= probability).tolist()
            if stage.num_fixed == 0 and not any(keep):
                keep[0] = True  # a stage of gateable blocks only keeps its first one
            for gate, on in zip(gates, keep):
                if gate is not None:
                    object.__setattr__(gate, "active", on)
        return self

    def _check_depth(self, blocks_per_stage: Sequence[int]) -> list[int]:
        limits = [(max(1, st.num_fixed), st.num_blocks) for st in self.stages]
        if isinstance(blocks_per_stage, (str, bytes)) or not isinstance(blocks_per_stage, Sequence):
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
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise DepthSpecError(
                    f"stage {stage.name!r} can run {lo}..{hi} blocks, got {value!r}; "
                    f"allowed counts per stage: {[f'{a}..{b}' for a, b in limits]}"
                )
            counts.append(int(value))
        return counts

    def _activate(self, counts: list[int], scaling_factor: float | None) -> None:
        """Switch the gates to ``counts`` blocks per stage, and the BatchNorm statistics to that depth's."""
        self._scaling_factor = scaling_factor
        if self.depth_norms is not None:
            self.depth_norms.use(scaling_factor)
        key = tuple(counts)
        switches = self._switches.get(key)
        if switches is None:
            masks = self._masks_for(counts)
            switches = self._switches[key] = [
                (gate, on)
                for gates, mask in zip(self._stage_gates, masks)
                for gate, on in zip(gates, mask)
                if gate is not None
            ]
        for gate, on in switches:
            # A plain bool attribute: skip nn.Module.__setattr__'s parameter / buffer / module checks.
            object.__setattr__(gate, "active", on)

    def _masks_for(self, counts: list[int]) -> list[list[bool]]:
        return [active_mask(st.gateable, k, self.config.policy) for st, k in zip(self.stages, counts)]

    @contextlib.contextmanager
    def scaled(self, scaling_factor: float) -> Iterator[AdaptiveDepth]:
        """Context manager: run at ``scaling_factor`` inside the block, restore the previous depth after."""
        previous_counts, previous_s = self.active_depth, self._scaling_factor
        self.set_scaling_factor(scaling_factor)
        try:
            yield self
        finally:
            self._activate(previous_counts, previous_s)

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
        in the statistics of the chosen depth (by reference, no copy) and :meth:`save_pretrained` saves them.
        A depth without its own set (a custom :meth:`set_depth`) uses the statistics the model was trained with.

        Args:
            batches: a re-iterable of image batches, or of ``(images, labels)`` (a ``DataLoader`` of training
                data), read once per depth, without augmentation ideally.
            scaling_factors: the depths to recalibrate (default: ``config.scaling_factors``).
            max_batches: read at most this many batches per depth.
            reduce: applied to every statistic at the end (e.g. a mean over processes).

        Returns:
            The number of images read at each depth. A model without BatchNorm is left unchanged (``{}``).
        """
        layers = batchnorm_layers(self.model)
        if not layers:
            logger.info("%s has no BatchNorm layer: nothing to recalibrate", type(self.model).__name__)
            return {}
        factors = [check_scaling_factor(s) for s in (scaling_factors or self.config.scaling_factors)]
        if self.depth_norms is None:
            self.depth_norms = DepthNorms(layers)
        current = self._scaling_factor
        seen = {}
        for s in factors:
            self.set_scaling_factor(s)
            self.depth_norms.release()
            images = (b[0] if isinstance(b, (tuple, list)) else b for b in itertools.islice(batches, max_batches))
            seen[s] = recalibrate_batchnorm(self.model, layers, images, reduce)
            self.depth_norms.capture(s)
        self.config.norm_stats = sorted(set(self.config.norm_stats) | set(factors))
        if current is None:
            self.depth_norms.use(None)
            self._scaling_factor = None
        else:
            self.set_scaling_factor(current)
        return seen

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model at the current depth (same signature and output)."""
        return self.model(*args, **kwargs)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A random batch of the configured input size, on the model's device and dtype."""
        param = next(self.model.parameters())
        x = torch.randn(batch_size, *self.config.input_size, generator=torch.Generator().manual_seed(0))
        return x.to(device=param.device, dtype=param.dtype)

    def flops(self, scaling_factor: float | None = None) -> int:
        """FLOPs of one forward pass on one ``input_size`` image, at ``scaling_factor`` (default: current)."""
        if scaling_factor is None:
            return count_flops(self.model, self.example_input())
        with self.scaled(scaling_factor):
            return count_flops(self.model, self.example_input())

    def flops_table(self) -> dict[float, int]:
        """FLOPs at every trained scaling factor (cached in ``config.flops``)."""
        table = {}
        for s in self.config.scaling_factors:
            key = str(s)
            if key not in self.config.flops:
                self.config.flops[key] = self.flops(s)
            table[s] = int(self.config.flops[key])
        return table

    def depth_summary(self) -> str:
        """A table of stages and blocks, and the blocks and FLOPs at each trained scaling factor."""
        lines = [
            f"{type(self.model).__name__}: {len(self.stages)} stages, discovery: {self.config.discovery}, "
            f"policy: {self.config.policy}, input {tuple(self.config.input_size)}",
            "",
        ]
        lines.append(f"{'stage':<40} {'blocks':>6} {'fixed':>5} {'gateable':>8}")
        for st in self.stages:
            lines.append(f"{st.name:<40} {st.num_blocks:>6} {st.num_fixed:>5} {st.num_blocks - st.num_fixed:>8}")
        lines.append("")
        full = self.flops_table().get(1.0) or self.flops(1.0)
        lines.append(f"{'s':>6} {'blocks per stage':<30} {'GFLOPs':>9} {'vs s=1':>7}")
        for s, flops in self.flops_table().items():
            depth = str(self.depth_for(s))
            lines.append(f"{s:>6.3g} {depth:<30} {flops / 1e9:>9.4f} {flops / full:>7.3f}")
        current = "custom" if self._scaling_factor is None else f"{self._scaling_factor:g}"
        lines.append(f"\ncurrent: s = {current}, blocks per stage {self.active_depth}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ budgets
    def profile(
        self,
        example_input: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        *,
        batch_size: int = 1,
        warmup: int = 5,
        repeats: int = 20,
    ) -> dict[float, float]:
        """Measure the latency of every trained depth on ``device`` and keep it (saved in ``config.json``).

        Run it on the device you deploy to; :meth:`set_budget` then picks depths by measured milliseconds.

        Args:
            example_input: a batch like the ones you serve (default: random, ``batch_size`` x ``input_size``).
            device: where to measure; the model is moved there and stays (default: where it is).
            batch_size: images per batch when no ``example_input`` is given.
            warmup, repeats: runs discarded, then runs whose median is kept, per depth.

        Returns:
            Milliseconds per forward pass at each trained scaling factor.
        """
        if device is not None:
            self.to(device)
        param = next(self.model.parameters())
        x = self.example_input(batch_size) if example_input is None else example_input
        x = x.to(device=param.device, dtype=param.dtype if x.is_floating_point() else x.dtype)
        was_training = self.training
        previous_counts, previous_s = self.active_depth, self._scaling_factor
        self.eval()

        def run_at(s: float) -> Callable[[], Any]:
            return lambda: self.set_scaling_factor(s)(x)  # a switch costs microseconds: part of serving

        try:  # depths timed in interleaved rounds, so machine noise touches them alike
            timed = measure_latencies_ms(
                {str(s): run_at(s) for s in self.config.scaling_factors},
                device=param.device,
                warmup=warmup,
                repeats=repeats,
            )
        finally:
            self._activate(previous_counts, previous_s)
            self.train(was_training)
        measured = {float(k): ms for k, ms in timed.items()}
        self.config.latency_profile = LatencyProfile(
            device=describe_device(param.device),
            batch_size=int(x.shape[0]),
            input_size=[int(v) for v in x.shape[1:]],
            dtype=str(param.dtype).removeprefix("torch."),
            latency_ms={str(s): ms for s, ms in measured.items()},
        ).to_dict()
        return measured

    @property
    def latency_profile(self) -> LatencyProfile | None:
        """The latencies measured by :meth:`profile` (or loaded with the model), if any."""
        data = self.config.latency_profile
        return LatencyProfile.from_dict(data) if data is not None else None

    def set_budget(self, *, max_flops: float | None = None, max_latency_ms: float | None = None) -> float:
        """Run at the largest trained depth that fits the budget; returns the scaling factor picked.

        Args:
            max_flops: the most FLOPs per image (at ``config.input_size``, as in :meth:`flops_table`).
            max_latency_ms: the most milliseconds per forward pass, as measured by :meth:`profile`.

        Raises:
            BudgetError: no trained depth fits, or a latency budget without a profile.
        """
        flops = self.flops_table()
        profile = self.latency_profile
        latency = {s: ms for s in flops if profile is not None and (ms := profile.at(s)) is not None}
        s = choose_scaling_factor(flops, latency, max_flops=max_flops, max_latency_ms=max_latency_ms)
        self.set_scaling_factor(s)
        measured = f", {latency[s]:.3g} ms on {profile.device}" if s in latency and profile is not None else ""
        logger.info("budget: running at s=%g (%.4g GFLOPs%s)", s, flops[s] / 1e9, measured)
        return s

    def export(self, scaling_factor: float | None = None, *, depth: Sequence[int] | None = None) -> nn.Module:
        """A plain timm / transformers module of one depth, with the skipped blocks removed.

        Args:
            scaling_factor: the depth to export (default: the current one).
            depth: explicit blocks per stage instead of a scaling factor.
        """
        if depth is not None:
            counts, s = self._check_depth(depth), None
        elif scaling_factor is not None:
            counts, s = self.depth_for(scaling_factor), check_scaling_factor(scaling_factor)
        else:
            counts, s = self.active_depth, self._scaling_factor
        previous_counts, previous_s = self.active_depth, self._scaling_factor
        self._activate(counts, s)  # the BatchNorm statistics of that depth go into the copy
        try:
            return export_depth(self.model, self.stages, self._masks_for(counts))
        finally:
            self._activate(previous_counts, previous_s)

    # ------------------------------------------------------------------ saving
    def _save_pretrained(self, save_directory: Path) -> None:
        self.flops_table()
        self.config.default_scaling_factor = self._scaling_factor or 1.0
        self.config.save(save_directory / CONFIG_NAME)
        norms = self.depth_norms
        if norms is not None:
            norms.use(None)  # model.safetensors holds the statistics the model was trained with
        try:
            save_model(self.model, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        finally:
            if norms is not None:
                norms.use(self._scaling_factor)
        if norms is not None and self.config.norm_stats:
            save_file(norms.to_tensors(), str(save_directory / NORMS_NAME), metadata={"format": "pt"})
        elif (save_directory / NORMS_NAME).exists():
            (save_directory / NORMS_NAME).unlink()  # a stale file from an earlier save of another model
        training = self.config.extra.get("training")
        if training and any(r.get("gflops") is not None for r in training.get("results", [])):
            pareto_plot(training["results"], save_directory / PLOT_NAME, title=self.config.base_model.name or "")
        readme = save_directory / "README.md"
        if readme.exists() and CARD_MARKER in readme.read_text(encoding="utf-8"):
            # A card we generated earlier: remove it so that ModelHubMixin.save_pretrained writes it afresh, with
            # this save's card arguments (the repo id of a push). A README of the user's own is never touched.
            readme.unlink()

    def push_to_hub(  # type: ignore[override]
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Save to a temporary folder and upload it to ``repo_id`` (see ``ModelHubMixin.push_to_hub``).

        The model card's loading snippet names ``repo_id``.
        """
        card_kwargs = {"repo_id": repo_id} | (model_card_kwargs or {})
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Model card with YAML metadata and the per-depth table."""
        return build_model_card(self, repo_id=kwargs.get("repo_id"))


def _fetch(resolved: Resolved, filename: str, hub: HubOptions) -> str:
    """Path of ``filename`` in a local folder or a Hub repo (downloaded to the cache)."""
    if resolved.local:
        path = Path(resolved.location) / filename
        if not path.is_file():
            raise CheckpointError(f"{resolved.location} has no {filename}; the checkpoint is incomplete, save it again")
        return str(path)
    try:
        return hub.download(resolved.location, filename)
    except LocalEntryNotFoundError as e:
        raise WeightsUnavailableError(
            f"{filename} of {resolved.location!r} is not in the local cache and the Hub cannot be reached"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"Hub repo {resolved.location!r} has no {filename}; the upload is incomplete") from e


WEIGHTS_CHOICES = ("auto", "pretrained", "random")


def pretrained_or_random(
    name: str | os.PathLike[str], *, weights: str = "auto", seed: int | None = None, **kwargs: Any
) -> AdaptiveDepth:
    """:meth:`AdaptiveDepth.from_pretrained` with an explicit choice of what happens when weights are missing.

    Args:
        name: timm name, Hub id or local folder.
        weights: ``"auto"``: pretrained weights when the Hub or the cache has them, else random initialisation
            with a loud warning; ``"pretrained"``: missing weights are an error; ``"random"``: random on purpose.
        seed: seeds ``torch`` before the model (and its new head) is built, so initialisation is reproducible.
        kwargs: passed to :meth:`AdaptiveDepth.from_pretrained`.
    """
    if weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    if seed is not None:
        torch.manual_seed(seed)
    if weights == "random":
        return AdaptiveDepth.from_pretrained(name, pretrained=False, **kwargs)
    try:
        return AdaptiveDepth.from_pretrained(name, pretrained=True, **kwargs)
    except WeightsUnavailableError as e:
        if weights == "pretrained":
            raise
        banner = "!" * 100
        logger.warning(
            "\n%s\nNO PRETRAINED WEIGHTS for %r: %s\nCONTINUING FROM RANDOM INITIALISATION: costs are real, accuracy "
            "is that of a model trained from scratch. Ask for pretrained weights to make this an error, or for random "
            "weights to say it is intended.\n%s",
            banner,
            str(name),
            e,
            banner,
        )
        if seed is not None:
            torch.manual_seed(seed)
        return AdaptiveDepth.from_pretrained(name, pretrained=False, **kwargs)
