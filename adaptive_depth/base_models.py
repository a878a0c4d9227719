"""Building a base model: a timm or transformers model from where :func:`~adaptive_depth.sources.resolve` found it,
or rebuilt from a saved adaptive-depth model's description.

``load_base_model`` builds the model with its pretrained weights (or random ones when the caller says
``pretrained=False``); ``describe_base_model`` records how to rebuild a model (:class:`~adaptive_depth.BaseModelRef`);
``rebuild_base_model`` rebuilds a saved adaptive-depth model's architecture without fetching the original weights
again. Missing weights are an error, never a silent fallback to random initialisation.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import timm
import transformers
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from .config import BaseModelRef
from .errors import CheckpointError, ConfigError, WeightsUnavailableError
from .preprocessing import timm_preprocessing
from .sources import OFFLINE_HINT, HubOptions, Resolved, close_timm_names

__all__ = ["BaseModel", "describe_base_model", "load_base_model", "rebuild_base_model"]

logger = logging.getLogger(__name__)


class BaseModel(NamedTuple):
    """A base model as loaded: the module, how to rebuild it, and (transformers) its image processor."""

    model: nn.Module
    ref: BaseModelRef
    processor: Any = None


def _unexpected_keyword(error: TypeError) -> bool:
    return "unexpected keyword argument" in str(error)


def _timm_kwargs(num_classes: int | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, **({"num_classes": num_classes} if num_classes is not None else {})}


def _load_timm(
    resolved: Resolved, pretrained: bool, num_classes: int | None, kwargs: dict[str, Any], hub: HubOptions
) -> BaseModel:
    name = resolved.location
    if resolved.local and not name.startswith("local-dir:"):
        name = f"local-dir:{name}"
    model_args = _timm_kwargs(num_classes, kwargs)
    if pretrained and ":" not in name:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            raise WeightsUnavailableError(
                f"timm has no pretrained weights for {name!r}; pass pretrained=False for random initialisation, "
                f"or pick a tagged variant from timm.list_pretrained('{timm.models.split_model_name_tag(name)[0]}*')"
            )
    try:
        model = timm.create_model(name, pretrained=pretrained, cache_dir=hub.cache_dir, **model_args)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise WeightsUnavailableError(
            f"cannot load pretrained weights for timm model {name!r}: {type(e).__name__}: {e}. {OFFLINE_HINT}"
        ) from e
    except TypeError as e:
        if not _unexpected_keyword(e):
            raise
        raise ConfigError(
            f"timm model {name!r}: {e}. Keyword arguments go to "
            "timm.create_model and the architecture's constructor (e.g. drop_path_rate, in_chans, img_size); the "
            "loading options are dtype and device_map"
        ) from e
    arch = model.pretrained_cfg.get("architecture") or timm.models.split_model_name_tag(name)[0]
    tag = model.pretrained_cfg.get("tag")
    ref = BaseModelRef(
        source="timm",
        name=resolved.location if ":" in resolved.location else (f"{arch}.{tag}" if tag and pretrained else arch),
        architecture=arch,
        model_args=_timm_rebuild_args(model, model_args),
        pretrained=pretrained,
        # timm keeps the checkpoint's classifier only when the class count is the checkpoint's own
        trained_head=pretrained and getattr(model, "num_classes", None) == model.pretrained_cfg.get("num_classes"),
        pretrained_cfg=timm_preprocessing(model.pretrained_cfg),
        license=model.pretrained_cfg.get("license") if pretrained else None,
    )
    return BaseModel(model, ref)


def _timm_rebuild_args(model: nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` kwargs that rebuild the same architecture (JSON-safe values only)."""
    args = {k: v for k, v in model_args.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    if hasattr(model, "num_classes"):
        args["num_classes"] = int(model.num_classes)
    return args


def _transformers_class(config: transformers.PretrainedConfig) -> type[transformers.PreTrainedModel]:
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForImageClassification


def _load_transformers(
    resolved: Resolved,
    pretrained: bool,
    num_classes: int | None,
    kwargs: dict[str, Any],
    hub: HubOptions,
    loader_kwargs: dict[str, Any],
) -> BaseModel:
    hub_args = {
        "revision": hub.revision,
        "cache_dir": hub.cache_dir,
        "token": hub.token,
        "local_files_only": hub.local_files_only,
    }
    config_kwargs = dict(kwargs)
    if num_classes is not None:
        config_kwargs["num_labels"] = num_classes
    try:
        # Config attributes set the config; the rest is for transformers' loader (dtype, device_map...) or unknown.
        config, unused = transformers.AutoConfig.from_pretrained(
            resolved.location, return_unused_kwargs=True, **hub_args, **config_kwargs
        )
        saved_labels = transformers.AutoConfig.from_pretrained(resolved.location, **hub_args).num_labels
        cls = _transformers_class(config)
        if pretrained:
            model = cls.from_pretrained(
                resolved.location,
                config=config,
                use_safetensors=True,
                ignore_mismatched_sizes=num_classes is not None,
                **hub_args,
                **loader_kwargs,
                **unused,
            )
        elif unused:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unused)}")
        else:
            model = cls(config)
    except OSError as e:
        raise WeightsUnavailableError(
            f"cannot load transformers model {resolved.location!r} (safetensors weights only): {e}. {OFFLINE_HINT}"
        ) from e
    except TypeError as e:
        if not _unexpected_keyword(e):
            raise
        raise ConfigError(
            f"transformers model {resolved.location!r}: {e}. Keyword arguments set attributes of the model's "
            "config, or go to transformers' loader with pretrained weights (dtype, device_map, quantization_config, "
            "attn_implementation...); this one is neither"
        ) from e
    ref = describe_base_model(model, name=resolved.location)
    ref.pretrained = pretrained
    ref.trained_head = pretrained and config.num_labels == saved_labels
    return BaseModel(model, ref, _image_processor(resolved.location, hub_args, pretrained))


def _image_processor(location: str, hub_args: dict[str, Any], pretrained: bool) -> Any:
    """The image processor saved with a transformers model, fetched like its weights (``None`` if it has none)."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(location, **hub_args)
    except (OSError, ValueError) as e:  # no preprocessor_config.json in the repo or folder (or not cached)
        if pretrained:
            logger.warning(
                "%s has no image processor (%s): its images are preprocessed with ImageNet mean and std and the "
                "config's image_size; pass your own statistics through a processor if the weights expect others",
                location,
                type(e).__name__,
            )
        return None


def load_base_model(
    resolved: Resolved,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    hub: HubOptions | None = None,
    loader_kwargs: dict[str, Any] | None = None,
) -> BaseModel:
    """Build the timm / transformers model ``resolved`` points to, with its pretrained weights unless told not to.

    ``model_kwargs`` go to ``timm.create_model`` or the transformers config; ``loader_kwargs`` to transformers'
    ``from_pretrained`` (``dtype``, ``device_map``, ``quantization_config``), with pretrained weights only.
    """
    hub = hub or HubOptions()
    kwargs = dict(model_kwargs or {})
    if resolved.kind == "timm":
        return _load_timm(resolved, pretrained, num_classes, kwargs, hub)
    if resolved.kind == "transformers":
        return _load_transformers(resolved, pretrained, num_classes, kwargs, hub, dict(loader_kwargs or {}))
    raise ValueError(f"cannot build a base model from a {resolved.kind!r} location")


def describe_base_model(model: nn.Module, name: str | None = None) -> BaseModelRef:
    """Record how to rebuild ``model``'s architecture (timm, transformers, or a user module)."""
    if isinstance(model, transformers.PreTrainedModel):
        return BaseModelRef(
            source="transformers",
            name=name or getattr(model.config, "_name_or_path", None) or None,
            architecture=type(model).__name__,
            hf_config=model.config.to_dict(),
        )
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and timm.is_model(str(pretrained_cfg.get("architecture"))):
        arch = pretrained_cfg["architecture"]
        tag = pretrained_cfg.get("tag")
        return BaseModelRef(
            source="timm",
            name=name or (f"{arch}.{tag}" if tag else arch),
            architecture=arch,
            model_args=_timm_rebuild_args(model, {}),
            pretrained_cfg=timm_preprocessing(pretrained_cfg),
        )
    return BaseModelRef(source="module", name=name, architecture=type(model).__name__)


def rebuild_base_model(ref: BaseModelRef, model: nn.Module | None = None) -> nn.Module:
    """A randomly initialised model with ``ref``'s architecture (the saved weights are loaded afterwards)."""
    if model is not None:
        return model
    if ref.source == "timm":
        if not timm.is_model(str(ref.architecture)):
            close = close_timm_names(str(ref.architecture))
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise CheckpointError(
                f"the saved config names timm architecture {ref.architecture!r}, which this timm "
                f"({timm.__version__}) does not have{hint}; upgrade timm or fix base_model.architecture"
            )
        overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in (ref.pretrained_cfg or {}).items()}
        try:
            return timm.create_model(
                ref.architecture, pretrained=False, pretrained_cfg_overlay=overlay, **ref.model_args
            )
        except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as e:
            raise CheckpointError(
                f"cannot rebuild timm model {ref.architecture!r} with the saved model_args {ref.model_args}: "
                f"{type(e).__name__}: {e}"
            ) from e
    if ref.source == "transformers":
        if not ref.hf_config or "model_type" not in ref.hf_config:
            raise CheckpointError("the saved config has no transformers config (base_model.hf_config)")
        hf_config = dict(ref.hf_config)
        try:
            # from_dict is to_dict's inverse (TimmWrapperConfig keeps its class count as num_classes there)
            config = transformers.CONFIG_MAPPING[hf_config["model_type"]].from_dict(hf_config)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the saved transformers config (base_model.hf_config) is invalid: {e}") from e
        cls = getattr(transformers, ref.architecture or "", None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(
                f"transformers has no model class {ref.architecture!r}; upgrade transformers "
                f"(installed: {transformers.__version__})"
            )
        return cls(config)
    raise CheckpointError(
        f"this checkpoint wraps a custom module ({ref.architecture}); build it yourself and pass it: "
        "AdaptiveDepth.from_pretrained(path, model=MyModel())"
    )
