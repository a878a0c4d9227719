"""One depth saved (or pushed) as an ordinary timm or transformers repository that loads without this library.

- transformers: ``export(s).save_pretrained`` (the config's ``depths`` / ``num_hidden_layers`` already hold the
  shallower architecture), with the class names in the config and the image processor, so that
  ``AutoModelForImageClassification.from_pretrained`` and ``pipeline("image-classification")`` load it.
- timm: ``timm.models.save_for_hf`` with the depth written as the architecture's own argument (ResNet ``layers``,
  ConvNeXt / Swin / MetaFormer ``depths``, ViT ``depth``) in ``model_args``, so that
  ``timm.create_model("hf-hub:<repo>")`` or ``timm.create_model("local-dir:<folder>")`` rebuilds and loads it. Where
  an architecture takes no such argument (RegNet, EfficientNet: depths derived from other settings), saving says so;
  ``save_pretrained`` of the adaptive model (loaded by this library) always works.
- A model that gates residual branches inside blocks (TinyViT, RepViT) exports at full depth only: no timm argument
  or transformers config describes a block without its branch, and saving another depth says so.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard
from torch import nn

from .errors import ConfigError
from .hub import replace_files_atomically
from .loading import timm_preprocessing
from .state import preserved

__all__ = ["ExportMixin"]

logger = logging.getLogger(__name__)

DEPTH_ARGUMENTS = ("layers", "depths", "depth")  # how timm architectures take their per-stage block counts


def _timm_depth_args(plain: nn.Module, counts: Sequence[int]) -> dict[str, Any]:
    """The ``create_model`` argument that gives ``plain``'s architecture these blocks per stage."""
    accepted = inspect.signature(type(plain).__init__).parameters
    for name in DEPTH_ARGUMENTS:
        if name in accepted:
            if name == "depth":
                if len(counts) != 1:
                    break
                return {"depth": int(counts[0])}
            return {name: [int(c) for c in counts]}
    raise ConfigError(
        f"timm's {type(plain).__name__} takes no per-stage depth argument ({' / '.join(DEPTH_ARGUMENTS)}), so an "
        "exported depth cannot be rebuilt by timm alone; save the adaptive model with save_pretrained() (it loads "
        "with adaptive-depth), or use the in-memory module of model.export(s)"
    )


def _check_no_branch_removed(config: Any, counts: Sequence[int]) -> None:
    """Refuse any depth but the full one of a model that gates residual branches (TinyViT, RepViT).

    No timm argument or transformers config describes a block without its branch, and the stages of such a model
    are not the architecture's own (TinyViT's first stage gates blocks, the others branches).
    """
    full = [st.num_blocks for st in config.stages]
    if not config.gates_branches or list(counts) == full:
        return
    skipped = [st.name for st, n, k in zip(config.stages, full, counts) if st.kind == "branch" and k < n]
    what = (
        f"skips residual branches inside blocks (stages {skipped})"
        if skipped
        else "gates residual branches inside blocks in some stages, so its stages are not the architecture's"
    )
    source = config.base_model.source
    raise ConfigError(
        f"cannot save blocks per stage {list(counts)} as a plain {source} repository: this model {what}, and {source} "
        "can rebuild a network only from whole-block depths. Save the adaptive model with save_pretrained() instead "
        "(it loads with AdaptiveDepth.from_pretrained, at every depth), or use the in-memory module of "
        "model.export(s)"
    )


def _check_rebuild(plain: nn.Module, folder: Path, example: torch.Tensor) -> None:
    """Load the saved folder the way a user without this library would, and compare one output."""
    import timm

    try:
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # timm raises many types when arguments and weights disagree
        raise ConfigError(f"timm cannot rebuild the exported depth from {folder} ({type(e).__name__}: {e})") from e
    with torch.no_grad(), preserved(plain, train=False):
        if not torch.allclose(rebuilt(example), plain(example), atol=1e-5, rtol=1e-4):
            raise ConfigError(f"timm rebuilds another network from {folder}: its outputs differ from the export's")


class ExportMixin:
    """``save_export`` / ``push_export`` for ``AdaptiveDepth`` (needs ``export``, ``depth_for``, ``config``...)."""

    model: nn.Module
    config: Any
    image_processor: Any

    def save_export(
        self, save_directory: str | Path, scaling_factor: float | None = None, *, depth: Sequence[int] | None = None
    ) -> Path:
        """Save one depth as a plain timm / transformers repository that loads without adaptive-depth.

        Args:
            save_directory: the folder (written atomically; a README of your own is kept).
            scaling_factor: the depth (default: the current one).
            depth: explicit blocks per stage instead.

        Returns:
            The folder. timm: ``timm.create_model("local-dir:<folder>")``; transformers:
            ``AutoModelForImageClassification.from_pretrained(<folder>)`` or ``pipeline("image-classification", ...)``.
        """
        counts, _ = self.resolve_depth(scaling_factor, depth)  # type: ignore[attr-defined]
        _check_no_branch_removed(self.config, counts)
        plain = self.export(scaling_factor, depth=depth).eval()  # type: ignore[attr-defined]
        folder = Path(save_directory)
        with replace_files_atomically(folder, keep_foreign=("README.md",)) as staging:
            if self.config.base_model.source == "transformers":
                self._save_transformers_export(plain, staging)
            elif self.config.base_model.source == "timm":
                self._save_timm_export(plain, counts, staging)
            else:
                raise ConfigError(
                    "this model wraps a custom module: save model.export(s) with torch yourself, or save the adaptive "
                    "model with save_pretrained()"
                )
            self._export_card(counts).save(staging / "README.md")
        if self.config.base_model.source == "timm":
            _check_rebuild(plain, folder, self.example_input(2))  # type: ignore[attr-defined]
        return folder

    def push_export(
        self, repo_id: str, scaling_factor: float | None = None, *, depth: Sequence[int] | None = None, **kwargs: Any
    ) -> str:
        """Save one depth with :meth:`save_export` and upload it to ``repo_id`` (``HfApi.upload_folder`` kwargs)."""
        api = HfApi(token=kwargs.pop("token", None))
        repo_id = api.create_repo(repo_id, private=kwargs.pop("private", None), exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_export(Path(tmp) / "export", scaling_factor, depth=depth)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)

    def _save_transformers_export(self, plain: nn.Module, folder: Path) -> None:
        import transformers

        plain.save_pretrained(folder)  # type: ignore[attr-defined]
        processor = self.image_processor
        if processor is None:  # pipeline() needs one: this model's own preprocessing, in the generic processor
            cfg = self.data_config  # type: ignore[attr-defined]
            h, w = cfg["input_size"][-2:]
            processor = transformers.ViTImageProcessor(
                size={"height": h, "width": w}, image_mean=list(cfg["mean"]), image_std=list(cfg["std"])
            )
        processor.save_pretrained(folder)

    def _save_timm_export(self, plain: nn.Module, counts: Sequence[int], folder: Path) -> None:
        from timm.models import save_for_hf

        labels = [name for _, name in sorted(self.config.id2label.items(), key=lambda kv: int(kv[0]))]
        cfg = timm_preprocessing(getattr(plain, "pretrained_cfg", {}))
        # A model that gates branches is exported at full depth only (see above): the original architecture.
        model_args = {} if self.config.gates_branches else _timm_depth_args(plain, counts)
        save_for_hf(
            plain,
            str(folder),
            model_config={"label_names": labels} if labels else None,
            model_args=model_args,
            safe_serialization=True,
            data_config={k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "label_names"},
        )

    def _export_card(self, counts: Sequence[int]) -> ModelCard:
        base = self.config.base_model
        source = base.source
        load = (
            'timm.create_model("hf-hub:<this repo>", pretrained=True)  # or "local-dir:<this folder>"'
            if source == "timm"
            else 'transformers.pipeline("image-classification", model="<this repo or folder>")'
        )
        return ModelCard(
            f"""---
library_name: {source}
pipeline_tag: image-classification
tags: [adaptive-depth, image-classification, {source}]
---

# {base.name or base.architecture}, {list(counts)} blocks per stage

One fixed depth of a depth-switchable model made with adaptive-depth, saved as a plain {source} model: the skipped
blocks are removed, and it loads with {source} alone.

```python
{load}
```
"""
        )
