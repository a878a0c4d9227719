"""Turning a name into a base model: timm names, Hub ids (timm or transformers repos), local folders.

``resolve`` looks at what a name points to; ``load_base_model`` builds the model with its pretrained
weights (or random ones when the caller says ``pretrained=False``); ``rebuild_base_model`` rebuilds a
saved adaptive-depth model's architecture without fetching the original weights again. Missing weights
are an error, never a silent fallback to random initialisation.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import timm
import transformers
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from .config import AdaptiveDepthConfig, BaseModelRef
from .errors import CheckpointError, ConfigError, UnknownModelError, WeightsUnavailableError

__all__ = [
    "PREPROCESSING_KEYS",
    "BaseModel",
    "HubOptions",
    "Resolved",
    "describe_base_model",
    "load_base_model",
    "rebuild_base_model",
    "resolve",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_OFFLINE_HINT = (
    "Connect to the Hub once (or download the files with `hf download <repo>`) so they are cached, "
    "or pass pretrained=False to start from random weights"
)


@dataclass
class HubOptions:
    """Where and how to fetch files from the Hub (the arguments of ``hf_hub_download``)."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False

    def download(self, repo_id: str, filename: str) -> str:
        """``hf_hub_download`` of one file with these options; returns its path in the cache."""
        return hf_hub_download(
            repo_id,
            filename,
            revision=self.revision,
            cache_dir=self.cache_dir,
            token=self.token,
            local_files_only=self.local_files_only,
            force_download=self.force_download,
        )


# The parts of a timm pretrained_cfg that describe how to feed the weights (not where they came from).
PREPROCESSING_KEYS = (
    "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "fixed_input_size", "test_input_size",
    "test_crop_pct", "label_names",
)  # fmt: skip


def timm_preprocessing(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe preprocessing part of a timm ``pretrained_cfg`` (tuples as lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in pretrained_cfg.items()
        if k in PREPROCESSING_KEYS and v is not None
    }


class BaseModel(NamedTuple):
    """A base model as loaded: the module, how to rebuild it, and (transformers) its image processor."""

    model: nn.Module
    ref: BaseModelRef
    processor: Any = None


@dataclass
class Resolved:
    """What a name points to.

    ``kind`` is ``"adaptive"`` (a saved adaptive-depth model), ``"timm"`` or ``"transformers"``; ``location``
    is a local folder, a Hub id, or a timm model name; ``config`` the parsed ``config.json`` if any.
    """

    kind: str
    location: str
    config: dict[str, Any] | None = None
    local: bool = False


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the file is corrupt or incomplete") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _kind_of(config: dict[str, Any], where: str) -> str:
    if AdaptiveDepthConfig.is_adaptive_depth_dict(config):
        return "adaptive"
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise UnknownModelError(
        f"{where} has a config.json that is neither an adaptive-depth, a timm nor a transformers config "
        "(no 'library_name', 'architecture' or 'model_type' key)"
    )


def _close_timm_names(name: str) -> list[str]:
    return difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)


def _timm_registry_name(name: str) -> str | None:
    """``"convnext_atto.d2_in1k"`` for a timm Hub id (``timm/convnext_atto.d2_in1k``, ``hf-hub:timm/...``) that timm's
    registry knows, so that a random initialisation needs no download; ``None`` otherwise."""
    org, _, repo = name.removeprefix("hf-hub:").removeprefix("hf_hub:").partition("/")
    if org != "timm" or not repo or "/" in repo:
        return None
    return repo if timm.is_model(timm.models.split_model_name_tag(repo)[0]) else None


def resolve(name_or_path: str | os.PathLike[str], hub: HubOptions, *, pretrained: bool = True) -> Resolved:
    """Find out whether ``name_or_path`` is a local folder, a Hub repo, or a timm registry name.

    With ``pretrained=False``, a timm Hub id that cannot be fetched is taken from timm's registry (its architecture
    and data config are there), so a random initialisation works offline.
    """
    name = str(name_or_path)
    if os.path.isfile(name):
        raise UnknownModelError(
            f"{name!r} is a file; pass the folder that holds it (with config.json and model.safetensors), a timm "
            "name or a Hub repo id"
        )
    if os.path.isdir(name):
        config_path = Path(name) / CONFIG_NAME
        if not config_path.is_file():
            raise UnknownModelError(
                f"folder {name!r} has no {CONFIG_NAME}; point to a folder written by save_pretrained() of "
                "adaptive-depth, timm or transformers"
            )
        config = _read_json(config_path)
        return Resolved(_kind_of(config, f"folder {name!r}"), name, config, local=True)
    if name.startswith(("hf-hub:", "hf_hub:")):
        registry = _timm_registry_name(name)
        if not pretrained and registry is not None and not _cached(name, hub):
            return Resolved("timm", registry)
        return Resolved("timm", name)
    if name.startswith("local-dir:"):
        return Resolved("timm", name, local=True)
    if "/" in name or os.sep in name:
        if name.startswith((".", os.sep, "~")) or name.count("/") != 1:
            raise UnknownModelError(f"folder {name!r} does not exist (and it is not a Hub repo id 'org/name')")
        try:
            config_path = hub.download(name, CONFIG_NAME)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise UnknownModelError(
                f"{name!r} is not a Hub repo you can read ({type(e).__name__}); check the spelling, the revision, "
                "and that you are logged in (`hf auth login`) for private or gated repos"
            ) from e
        except LocalEntryNotFoundError as e:
            registry = _timm_registry_name(name)
            if not pretrained and registry is not None:
                logger.info("%s is not cached and the Hub is unreachable: timm's registry entry %s", name, registry)
                return Resolved("timm", registry)
            hint = (
                _OFFLINE_HINT
                if pretrained
                else "Its architecture is described by the repo's config.json, which random initialisation needs too: "
                "connect to the Hub once (or `hf download <repo>`), or name a timm architecture (e.g. 'resnet50', "
                "timm.list_models()) or a local folder"
            )
            raise WeightsUnavailableError(
                f"cannot fetch {name!r}: there is no local folder of that name, the Hub is unreachable (offline, or "
                f"HF_HUB_OFFLINE=1) and the repo is not in the local cache. {hint}"
            ) from e
        except EntryNotFoundError as e:
            raise UnknownModelError(
                f"Hub repo {name!r} has no {CONFIG_NAME}; it is not a model this library reads"
            ) from e
        config = _read_json(config_path)
        kind = _kind_of(config, f"Hub repo {name!r}")
        return Resolved(kind, f"hf-hub:{name}" if kind == "timm" else name, config)
    arch, _tag = timm.models.split_model_name_tag(name)
    if timm.is_model(arch):
        return Resolved("timm", name)
    close = _close_timm_names(arch)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownModelError(
        f"{name!r} is not a timm model name, a Hub repo id ('org/name') or an existing folder.{hint} "
        "See timm.list_models() for timm names"
    )


def _cached(hub_name: str, hub: HubOptions) -> bool:
    """True if the config of ``hf-hub:<repo>`` can be had (the Hub reachable, or the file cached)."""
    try:
        hub.download(hub_name.split(":", 1)[1], CONFIG_NAME)
    except (LocalEntryNotFoundError, OSError):
        return False
    except Exception:  # a missing or private repo: timm reports it as it would
        return True
    return True


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
            f"cannot load pretrained weights for timm model {name!r}: {type(e).__name__}: {e}. {_OFFLINE_HINT}"
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
            f"cannot load transformers model {resolved.location!r} (safetensors weights only): {e}. {_OFFLINE_HINT}"
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
            close = _close_timm_names(str(ref.architecture))
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
