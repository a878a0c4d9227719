"""The files of a saved adaptive-depth model: their names, and the code that writes, reads and checks each one.

A saved model is a folder (or Hub repo) of:

- ``config.json``: the :class:`~adaptive_depth.AdaptiveDepthConfig` (stages, policy, preprocessing, class names,
  training report). Its ``files`` fingerprint every other file of the save, so a folder that mixes two saves is
  refused.
- ``model.safetensors``: the base model's weights, with the BatchNorm statistics of training. Its metadata records a
  digest of the structure it was saved with (stages, policy, recalibrated depths), so a hand-edited ``config.json``
  is caught on load instead of silently running a different network.
- ``depth_norms.safetensors``, after per-depth recalibration: one set of BatchNorm statistics per recalibrated depth
  (``"<depth>/<layer>.running_mean"``, ``"<depth>/<layer>.running_var"``).
- ``preprocessor_config.json``: a transformers base's image processor, as transformers writes it.
- ``README.md`` (the model card, :mod:`adaptive_depth.saved.card`) and, after training, ``pareto.png``.

:func:`write_files` writes them; :func:`read_files` reads every one and checks it against the config and the rebuilt
base model before anything is gated or loaded. :mod:`adaptive_depth.saved.atomic` makes a save complete or invisible
across all its files.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.constants import CONFIG_NAME, REPOCARD_NAME, SAFETENSORS_SINGLE_FILE
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from ..base_models import rebuild_base_model
from ..config import AdaptiveDepthConfig
from ..errors import CheckpointError, ConfigError
from ..gates import check_structure, unwrap_gates
from ..norms import STATS, DepthNorms, batchnorm_layers
from ..policy import depth_key
from ..report import TrainingReport, pareto_plot
from ..sources import HubOptions, Resolved, fetch

if TYPE_CHECKING:
    from ..tuner import DepthTuner

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "NORMS_NAME",
    "OPTIONAL_FILES",
    "PLOT_NAME",
    "PROCESSOR_NAME",
    "SAVE_ID_KEY",
    "STRUCTURE_KEY",
    "WEIGHTS_NAME",
    "SavedModel",
    "check_saved_together",
    "check_storable",
    "check_weights",
    "fingerprint_json",
    "load_image_processor",
    "read_files",
    "read_safetensors",
    "write_files",
]

# CONFIG_NAME, "config.json", is huggingface_hub's: ModelHubMixin.save_pretrained removes and writes that name.
WEIGHTS_NAME = SAFETENSORS_SINGLE_FILE  # "model.safetensors", as huggingface_hub, timm and transformers name it
NORMS_NAME = "depth_norms.safetensors"
PROCESSOR_NAME = "preprocessor_config.json"  # a transformers base's image processor, as transformers writes it
CARD_NAME = REPOCARD_NAME  # "README.md": the model card, ours or the user's
PLOT_NAME = "pareto.png"  # accuracy against FLOPs, for a model trained by this library
OPTIONAL_FILES = (NORMS_NAME, PROCESSOR_NAME, PLOT_NAME)  # written only by the models that have them
STRUCTURE_KEY = "adaptive_depth.structure"  # safetensors metadata: the config digest the weights were saved with
SAVE_ID_KEY = "adaptive_depth.save_id"  # safetensors metadata: the save that wrote the file (config.files lists it)


# ---------------------------------------------------------------------- writing
def write_files(folder: Path, tuner: DepthTuner) -> None:
    """Write a depth-switchable model's files into ``folder`` (a save's temporary folder: see
    :func:`~adaptive_depth.saved.atomic.replace_files_atomically`).

    ``tuner.config`` records the save before it is written: the default depth, the FLOPs table, the recalibrated
    depths, and the fingerprint of every file.

    Raises:
        ConfigError: the model holds weights that safetensors cannot store (see :func:`check_storable`).
    """
    check_storable(tuner.model)
    config = tuner.config
    tuner.flops_table()  # counted now, so that config.json caches it
    config.default_scaling_factor = tuner.scaling_factor or 1.0
    norms = tuner.depth_norms
    if norms is None:
        config.norm_stats = []
    save_id = uuid.uuid4().hex  # in every safetensors file and in config.json: a mixed folder is refused
    config.files = {WEIGHTS_NAME: save_id}
    config.image_processor = tuner.image_processor is not None
    if tuner.image_processor is not None:
        tuner.image_processor.save_pretrained(folder)  # preprocessor_config.json, as transformers reads it
        config.files[PROCESSOR_NAME] = fingerprint_json(folder / PROCESSOR_NAME)
    metadata = {"format": "pt", STRUCTURE_KEY: config.structure_digest(), SAVE_ID_KEY: save_id}
    if norms is not None:
        norms.suspend()  # model.safetensors holds the statistics the model was trained with
    try:
        save_model(tuner.model, str(folder / WEIGHTS_NAME), metadata=metadata)
    finally:
        if norms is not None:
            norms.resume()
    if norms is not None and config.norm_stats:
        sets = {depth_key(s): tuple(tuner.depth_for(s)) for s in config.norm_stats}
        save_file(_norm_tensors(norms, sets), str(folder / NORMS_NAME), metadata={"format": "pt", SAVE_ID_KEY: save_id})
        config.files[NORMS_NAME] = save_id
    config.save(folder / CONFIG_NAME)
    training = config.extra.get("training")
    report = TrainingReport.from_dict(training) if training else None
    if report is not None and report.has_costs:
        pareto_plot([r.to_dict() for r in report.results], folder / PLOT_NAME, title=config.base_model.name or "")


def _norm_tensors(norms: DepthNorms, sets: Mapping[str, Hashable]) -> dict[str, torch.Tensor]:
    """``{"<name>/<layer>.running_mean": tensor, ...}`` of the set of each ``name -> key`` of ``sets``."""
    out = {}
    written: set[Hashable] = set()
    for prefix, key in sets.items():
        for layer, stats in norms.statistics(key).items():
            for stat, tensor in zip(STATS, stats):
                value = tensor.contiguous()
                # two names of one set (depths that run the same blocks): safetensors refuses shared storage
                out[f"{prefix}/{layer}.{stat}"] = value.clone() if key in written else value
        written.add(key)
    return out


# ---------------------------------------------------------------------- reading
@dataclass
class SavedModel:
    """A saved model's files, read and checked (:func:`read_files`); nothing gated or loaded yet.

    Args:
        config: the config of the save.
        base: the base model, rebuilt from the config (or the module the caller passed).
        tensors: the weights of ``model.safetensors``.
        processor: the transformers image processor (``None``: the save has none).
        norms: the per-depth statistics' holder for ``base``'s BatchNorm layers (``None``: nothing recalibrated).
        norm_tensors: the tensors of ``depth_norms.safetensors``.
        norm_names: each set's name in that file -> its scaling factor.
        norms_path: the file's path, named in errors.
    """

    config: AdaptiveDepthConfig
    base: nn.Module
    tensors: dict[str, torch.Tensor]
    processor: Any = None
    norms: DepthNorms | None = None
    norm_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    norm_names: dict[str, float] = field(default_factory=dict)
    norms_path: str = ""

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype of the saved weights (their first floating tensor's): what ``dtype="auto"`` loads in."""
        floating = [t.dtype for t in self.tensors.values() if t.is_floating_point()]
        return floating[0] if floating else None

    def load_into(self, tuner: DepthTuner) -> None:
        """Load the weights, image processor and per-depth statistics into ``tuner`` (made from :attr:`base`), at the
        saved default depth. If that fails, the gates are taken out of :attr:`base` again."""
        tuner.image_processor = self.processor
        try:
            tuner.model.load_state_dict(self.tensors, strict=False)  # complete: check_weights counted shared names
            if self.norms is not None:
                tuner.depth_norms = self.norms
                keys = {name: tuple(tuner.depth_for(s)) for name, s in self.norm_names.items()}
                _load_norm_tensors(self.norms, self.norm_tensors, keys, self.norms_path)
            tuner.set_scaling_factor(self.config.default_scaling_factor)
        except Exception:
            unwrap_gates(self.base)
            raise


def read_files(resolved: Resolved, hub: HubOptions, model: nn.Module | None = None) -> SavedModel:
    """Read a saved model's files and check every one against its config and the rebuilt base model.

    Nothing is gated or loaded here, so a refused save leaves a ``model`` the caller passed exactly as it was.

    Args:
        resolved: the save (:func:`~adaptive_depth.sources.resolve` found an ``"adaptive"`` model there).
        hub: how to fetch its files from the Hub.
        model: for a save that wraps a custom module: an instance of that module.

    Raises:
        CheckpointError: a file is missing, corrupt, written by another save, or does not fit the config or model.
    """
    config = AdaptiveDepthConfig.from_dict(resolved.config or {})
    weights_path = fetch(resolved, WEIGHTS_NAME, hub)
    tensors, metadata = read_safetensors(weights_path)
    base = rebuild_base_model(config.base_model, model)
    check_structure(base, config)
    check_weights(base, tensors, metadata, config, weights_path)
    check_saved_together(config, WEIGHTS_NAME, weights_path, metadata=metadata)
    saved = SavedModel(config, base, tensors, norm_names={depth_key(s): s for s in config.norm_stats})
    if saved.norm_names:
        saved.norms_path = fetch(resolved, NORMS_NAME, hub)
        saved.norm_tensors, norms_metadata = read_safetensors(saved.norms_path)
        check_saved_together(config, NORMS_NAME, saved.norms_path, metadata=norms_metadata)
        saved.norms = DepthNorms(batchnorm_layers(base))
        _check_norm_tensors(saved.norms, saved.norm_tensors, saved.norm_names, saved.norms_path)
    elif resolved.local and STRUCTURE_KEY not in metadata and (Path(resolved.location) / NORMS_NAME).is_file():
        raise CheckpointError(
            f"{resolved.location} holds {NORMS_NAME} but its config.json lists no recalibrated depths "
            "(norm_stats is empty): the config was edited; save the model again"
        )
    if config.image_processor:
        processor_path = fetch(resolved, PROCESSOR_NAME, hub)
        if config.files:  # a save that fingerprinted its files
            check_saved_together(config, PROCESSOR_NAME, processor_path)
        saved.processor = load_image_processor(processor_path)
    return saved


def _check_norm_tensors(
    norms: DepthNorms, tensors: Mapping[str, torch.Tensor], names: Iterable[str], source: str
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` hold exactly the sets ``names``, shaped as the layers."""
    expected = {
        f"{n}/{layer}.{stat}": norms.layers[layer] for n in names for layer in sorted(norms.layers) for stat in STATS
    }
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model's BatchNorm layers and the depths its config.json lists "
            f"(norm_stats): missing {missing[:5]}, unexpected {unexpected[:5]}; save the model again"
        )
    for key, layer in expected.items():
        if tensors[key].shape != layer.running_mean.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensors[key].shape)}, the layer has "
                f"{tuple(layer.running_mean.shape)}; the file belongs to another model"
            )


def _load_norm_tensors(
    norms: DepthNorms, tensors: Mapping[str, torch.Tensor], names: Mapping[str, Hashable], source: str
) -> None:
    """Add the sets of ``tensors`` to ``norms``, each ``name -> key``; every expected tensor must be there."""
    _check_norm_tensors(norms, tensors, names, source)
    like = next(iter(norms.layers.values())).running_mean
    sets = {}
    for prefix, key in names.items():
        sets[key] = {n: tuple(tensors[f"{prefix}/{n}.{stat}"].to(like) for stat in STATS) for n in norms.layers}
    norms.add_sets(sets)


# ---------------------------------------------------------------------- checks
def load_image_processor(path: str | os.PathLike[str]) -> Any:
    """The transformers image processor saved as ``path`` (a ``preprocessor_config.json``)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(str(Path(path).parent))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid image processor config ({e}); save the model again") from e


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its metadata; a corrupt file is a :class:`CheckpointError`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); save or download it again") from e


def check_weights(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    config: AdaptiveDepthConfig,
    source: str,
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` fit ``model`` and ``config`` is the one saved with them.

    Nothing is loaded: this runs before the model is touched, so a refused checkpoint leaves the model as it was.
    Tensors that ``safetensors.torch.save_model`` dropped as duplicates of shared storage (named in the metadata)
    count as present.
    """
    saved = metadata.get(STRUCTURE_KEY)
    if saved is not None and saved != config.structure_digest():
        raise CheckpointError(
            f"{source} was saved with other stages, depth policy or recalibrated depths than its config.json lists "
            "(the config was edited, or belongs to another save). Save the model again; to gate other blocks, wrap "
            "the base model again with block_patterns=[...]"
        )
    state = model.state_dict()
    present = set(tensors) | {alias for alias, kept in metadata.items() if kept in tensors}
    missing, unexpected = sorted(set(state) - present), sorted(set(tensors) - set(state))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(state[k].shape)} in the model"
        for k in sorted(set(tensors) & set(state))
        if tensors[k].shape != state[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the weights in {source} do not match the {config.base_model.architecture} architecture of its "
            f"config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}"
        )


def check_storable(model: nn.Module) -> None:
    """Raise :class:`ConfigError` if ``model``'s state holds what safetensors cannot store (quantized modules)."""
    state = model.state_dict()
    packed = sorted(
        {name.rsplit(".", 2)[0] for name, v in state.items() if not isinstance(v, torch.Tensor)}
        | {name.rsplit(".", 1)[0] for name, v in state.items() if isinstance(v, torch.Tensor) and v.is_quantized}
    )
    if packed:
        raise ConfigError(
            f"save_pretrained() cannot save this model: {len(packed)} module(s) hold quantized or packed weights "
            f"(e.g. {packed[:3]}, made by torch.ao.quantization.quantize_dynamic or similar), which safetensors "
            "cannot store. Save the float model and quantize it again after loading, or export one depth "
            "(model.export(s)) and save that with torch.export / ONNX"
        )


def check_saved_together(
    config: AdaptiveDepthConfig, name: str, source: str, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Raise :class:`CheckpointError` unless the file ``name`` was written by the same save as ``config``.

    ``config.files`` fingerprints every file a save wrote: safetensors files by the save's id (also in their
    metadata), JSON files by the SHA-256 of their bytes. A folder that mixes two saves (one interrupted, or running
    now) fails here instead of loading the weights of one model with the settings of another.

    Args:
        config: the loaded ``config.json``.
        name: the file's name in the save (``model.safetensors``...).
        source: the file's path, read when ``metadata`` is not given, and named in the error.
        metadata: the safetensors metadata of the file, for safetensors files.
    """
    found = (metadata or {}).get(SAVE_ID_KEY) if metadata is not None else _sha256(source)
    expected = config.files.get(name)
    if not config.files and metadata is not None and found is None:
        return  # a save that recorded no fingerprints (config.files empty, none in the metadata): nothing to compare
    if found != expected:
        raise CheckpointError(
            f"{source} was written by another save than the {CONFIG_NAME} beside it (fingerprint {found!r}, the config "
            f"lists {expected!r}): the folder mixes two saves, because a save into it is running now or was "
            "interrupted and could not be finished. Load it again when the save has ended; if this persists, save "
            "the model again"
        )


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_json(path: Path) -> str:
    """The fingerprint ``config.files`` keeps for a JSON file of a save (the SHA-256 of its bytes)."""
    return _sha256(path)
