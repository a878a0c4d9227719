"""``AdaptiveDepth``: a timm / transformers vision model whose depth can be switched at inference time.

The public class: building (:meth:`AdaptiveDepth.wrap`, :meth:`AdaptiveDepth.from_pretrained`), saving, loading,
pushing and the model card. Switching depth, per-depth norms, costs and export live in its base class,
:class:`~adaptive_depth.tuner.DepthTuner`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from . import export_repo
from .base_models import describe_base_model, load_base_model
from .config import AdaptiveDepthConfig, BaseModelRef
from .discovery import discover
from .errors import CheckpointError, ConfigError, WeightsUnavailableError
from .gates import is_gated
from .load_options import LoadOptions, check_saved_model_arguments, saved_num_classes
from .preprocessing import PreprocessingMixin, default_input_size, record_input_size
from .report import TrainingReport
from .saved import (
    CARD_NAME,
    OPTIONAL_FILES,
    build_model_card,
    read_files,
    recover_interrupted_saves,
    replace_files_atomically,
    write_files,
)
from .sources import HubOptions, Resolved, resolve
from .tuner import DepthTuner

__all__ = ["AdaptiveDepth", "pretrained_or_random"]

logger = logging.getLogger(__name__)
MIN_SAVING = 0.2  # a wrap whose fewest blocks save less than this share of the FLOPs warns


class AdaptiveDepth(
    DepthTuner,
    PreprocessingMixin,
    ModelHubMixin,
    library_name="adaptive-depth",
    tags=["adaptive-depth", "image-classification"],
    pipeline_tag="image-classification",
):
    """A vision model with depth gates on its residual blocks.

    Build one with :meth:`from_pretrained` (timm name, Hub id, local folder, or a saved adaptive-depth
    model) or :meth:`wrap` (a module you built). The call signature and output type are those of the
    wrapped model; :meth:`set_scaling_factor` / :meth:`set_depth` choose how many blocks run.

    ``state_dict()`` holds the BatchNorm statistics the model was trained with, whatever depth is active, and
    ``load_state_dict()`` writes those; the per-depth statistics of :meth:`recalibrate_norms` live in
    ``model.depth_norms`` and are saved by :meth:`save_pretrained` in a file of their own.

    Args:
        model: the base model; its gateable blocks are wrapped in place.
        config: stages, policy and metadata (from discovery or a saved ``config.json``).
    """

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
        if isinstance(model, torch.jit.ScriptModule):
            raise ConfigError(
                f"{type(model).__name__} is a TorchScript module (scripted or traced): its blocks cannot be replaced "
                "by gates. Wrap the eager nn.Module, then export a depth with model.export(s) and script that"
            )
        if is_gated(model):
            raise ConfigError(
                f"this {type(model).__name__} already has depth gates (it was wrapped before); use the AdaptiveDepth "
                "model you have, or adaptive_depth.gates.unwrap_gates(model) first"
            )
        if example_input is None:
            size = list(input_size) if input_size is not None else default_input_size(model)
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
        logger.info("found %d gateable blocks in %d stages (%s)", config.num_gateable, len(config.stages), found.method)
        record_input_size(model, config)
        wrapped = cls(model, config)
        saving = 1 - wrapped.fewest_blocks_flops_ratio()
        if saving < MIN_SAVING:
            logger.warning(
                "only %.0f%% of %s's FLOPs can be skipped (gateable blocks: %s): the gateable blocks hold little of "
                "its compute (a stem, head or blocks without a residual path hold the rest); depth_summary() shows "
                "them, and block_patterns=... can name other blocks",
                100 * saving,
                type(model).__name__,
                ", ".join(f"{st.name} {st.num_blocks - st.num_fixed}/{st.num_blocks}" for st in config.stages),
            )
        return wrapped

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        pretrained: bool = True,
        num_classes: int | None = None,
        model: nn.Module | None = None,
        policy: str | None = None,
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
            model: for a saved model that wraps a custom module: an instance of that module. If loading fails,
                it is left exactly as it was.
            policy, scaling_factors, block_patterns, input_size: see :meth:`wrap`. A saved model honours
                ``scaling_factors`` (the depths it reports) and ``input_size`` (checked by one forward pass); its
                ``policy`` and blocks are those it was trained with, and another value is an error.
            revision, cache_dir, token, local_files_only, force_download: Hub download options.
            **model_kwargs: ``dtype`` (or ``torch_dtype``), ``device_map`` (one device) and, for a transformers base
                with pretrained weights, ``quantization_config``, as transformers takes them; the rest goes to
                ``timm.create_model`` or the transformers config (e.g. ``drop_path_rate``, ``in_chans``). A name that
                nothing takes is an error.
        """
        hub = HubOptions(revision, cache_dir, token, local_files_only, force_download)
        if os.path.isdir(pretrained_model_name_or_path):
            recover_interrupted_saves(Path(pretrained_model_name_or_path))
        resolved = resolve(pretrained_model_name_or_path, hub, pretrained=pretrained)
        options = LoadOptions.pop_from(model_kwargs)
        if resolved.kind == "adaptive":
            where = str(pretrained_model_name_or_path)
            options.check_without_quantization(f"the saved adaptive-depth model {where}")
            saved_policy = (resolved.config or {}).get("policy")
            check_saved_model_arguments(
                where,
                saved_policy=saved_policy,
                policy=policy,
                num_classes=num_classes,
                saved_classes=saved_num_classes(resolved.config),
                block_patterns=block_patterns,
                model_kwargs=model_kwargs,
            )
            loaded = cls._load_saved(resolved, hub, model, options)
            if scaling_factors is not None:
                loaded.config.scaling_factors = AdaptiveDepthConfig(
                    base_model=loaded.config.base_model, stages=loaded.config.stages, scaling_factors=scaling_factors
                ).scaling_factors
            if input_size is not None:
                loaded.use_input_size(input_size)
            return loaded
        if model is not None:
            raise ConfigError("model= is only for loading a saved adaptive-depth model that wraps a custom module")
        loader_kwargs = {}
        if resolved.kind == "transformers" and pretrained:
            loader_kwargs, options = options.for_transformers(), LoadOptions()  # transformers applies them
        else:
            options.check_without_quantization(f"{resolved.location!r} ({resolved.kind}, pretrained={pretrained})")
        if "img_size" in model_kwargs and input_size is None:
            size = model_kwargs["img_size"]
            h, w = (size, size) if isinstance(size, int) else size
            input_size = [int(model_kwargs.get("in_chans", 3)), h, w]
        base, ref, processor = load_base_model(
            resolved,
            pretrained=pretrained,
            num_classes=num_classes,
            model_kwargs=model_kwargs,
            hub=hub,
            loader_kwargs=loader_kwargs,
        )
        wrapped = cls.wrap(
            base,
            policy=policy or "last",
            scaling_factors=scaling_factors,
            block_patterns=block_patterns,
            input_size=input_size,
            base_model=ref,
        )
        wrapped.image_processor = processor
        options.apply(wrapped)  # after discovery, which probed the model in float32
        return wrapped

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
        if os.path.isdir(model_id):
            recover_interrupted_saves(Path(model_id))
        resolved = resolve(model_id, hub)
        if resolved.kind != "adaptive":
            raise CheckpointError(f"{model_id!r} is a {resolved.kind} model, not a saved adaptive-depth model")
        return cls._load_saved(resolved, hub, model)

    @classmethod
    def _load_saved(
        cls, resolved: Resolved, hub: HubOptions, model: nn.Module | None, options: LoadOptions | None = None
    ) -> AdaptiveDepth:
        """Check every file against the config and the model first; only then gate the model and load."""
        saved = read_files(resolved, hub, model)
        instance = cls(saved.base, saved.config)  # the first change to a model the caller passed
        saved.load_into(instance)
        if options is not None:
            options.apply(instance, saved.weights_dtype)
        return instance.eval()

    def use_input_size(self, input_size: Sequence[int]) -> AdaptiveDepth:
        """Run at another ``[C, H, W]``: preprocessing, FLOPs and the example input follow; checked by one forward pass.

        Raises:
            ConfigError: the model does not run at that size (a ViT with a fixed position embedding, other channels).
        """
        previous = list(self.config.input_size)
        self.config.input_size = AdaptiveDepthConfig(
            base_model=self.config.base_model, stages=self.config.stages, input_size=list(input_size)
        ).input_size
        try:
            with torch.no_grad(), self.scaled(1.0):
                self(self.example_input())
        except Exception as e:
            self.config.input_size = previous
            raise ConfigError(
                f"{type(self.model).__name__} does not run at input_size={list(input_size)!r} ({type(e).__name__}: "
                f"{e}); it was saved at {previous}"
            ) from e
        record_input_size(self.model, self.config)
        return self

    @property
    def training_report(self) -> TrainingReport | None:
        """How this model was trained (accuracy per player and depth, settings), if it was trained by this library."""
        data = self.config.extra.get("training")
        return TrainingReport.from_dict(data) if data else None

    # ------------------------------------------------------------------ saving
    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: dict[str, Any] | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save ``config.json``, ``model.safetensors`` (and per-depth norms, plot, card) to a folder, atomically.

        Every file is written to a temporary folder first and moved into place only when all are complete, so a
        failed save (a full disk) leaves the previous save in ``save_directory`` loadable. A ``README.md`` you
        wrote yourself is never overwritten. See ``ModelHubMixin.save_pretrained`` for the push arguments.
        """
        if config is not None:
            raise ConfigError("save_pretrained() writes the model's own config; edit model.config instead")
        folder = Path(save_directory)
        # A file of OPTIONAL_FILES that this save does not write belongs to an earlier save of another model: it goes.
        # The depth lock holds the model as it is between the scaled() blocks of serving threads.
        with (
            replace_files_atomically(folder, keep_foreign=(CARD_NAME,), replaces=OPTIONAL_FILES) as staging,
            self.depth_lock(),
        ):
            super().save_pretrained(staging, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or folder.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """``ModelHubMixin`` hook: the model's files (:func:`adaptive_depth.saved.write_files`); the mixin adds the
        card."""
        write_files(save_directory, self)

    def push_to_hub(  # type: ignore[override]
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Save to a temporary folder and upload it to ``repo_id`` (see ``ModelHubMixin.push_to_hub``).

        The model card's loading snippet names ``repo_id``.
        """
        card_kwargs = {"repo_id": repo_id} | (model_card_kwargs or {})
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    # ------------------------------------------------------------------ exports (functions in export_repo.py)
    save_export = export_repo.save_export
    push_export = export_repo.push_export

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Model card with YAML metadata and the per-depth table."""
        flops = self.flops_table()
        depths = {s: self.depth_for(s) for s in flops}
        return build_model_card(self.config, flops, depths, repo_id=kwargs.get("repo_id"))


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
