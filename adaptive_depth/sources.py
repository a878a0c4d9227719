"""Where a model comes from: a timm registry name, a Hub repo (timm, transformers or a saved adaptive-depth model),
or a local folder; and fetching a file of it.

:func:`resolve` looks at what a name points to without building anything; :func:`fetch` gives the path of one of its
files (downloaded into the Hub cache). Building the model is :mod:`adaptive_depth.base_models`' part, reading a saved
adaptive-depth model's files :mod:`adaptive_depth.saved`'s.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import hf_hub_download
from huggingface_hub.constants import CONFIG_NAME
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .config import AdaptiveDepthConfig
from .errors import CheckpointError, UnknownModelError, WeightsUnavailableError

__all__ = ["OFFLINE_HINT", "HubOptions", "Resolved", "close_timm_names", "fetch", "resolve"]

logger = logging.getLogger(__name__)

OFFLINE_HINT = (
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


def close_timm_names(name: str) -> list[str]:
    """Up to three timm model names close to ``name``, for a "did you mean" hint."""
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
                OFFLINE_HINT
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
    close = close_timm_names(arch)
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


def fetch(resolved: Resolved, filename: str, hub: HubOptions) -> str:
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
