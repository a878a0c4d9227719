"""The one source of truth for an adaptive-depth model: a dataclass that round-trips through JSON.

``AdaptiveDepthConfig`` records what the base model is (so it can be rebuilt without its original weights),
the stages and blocks discovery found (so loading needs no new probe), the depth policy, the trained
scaling factors and measured metadata. It is saved as ``config.json`` beside ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .budget import LatencyProfile
from .errors import ConfigError, ScalingFactorError
from .flops import COUNTING_REVISION
from .policy import POLICIES, check_scaling_factor, depth_key

__all__ = ["LIBRARY_NAME", "AdaptiveDepthConfig", "BaseModelRef", "BlockSpec", "StageSpec"]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "adaptive-depth"
FORMAT_VERSION = 1
DEFAULT_SCALING_FACTORS = (0.25, 0.5, 0.75, 1.0)
BASE_SOURCES = ("timm", "transformers", "module")
UNIT_KINDS = ("block", "branch")
OUTPUTS = ("tensor", "tuple", "inputs")  # what a block returns (BlockSpec.output)
GATE_LABELS = {"block": "blocks", "branch": "branches"}  # what a stage of each kind gates, as summaries print it


@dataclass
class BlockSpec:
    """One gate unit of a stage: a residual block, or a residual branch inside a block.

    Args:
        name: qualified module name inside the base model (``model.get_submodule(name)``).
        gateable: True for a residual block whose output has its input's shape; False for a fixed
            (shape-changing) block, which always runs.
        input_kwarg: keyword that carries the block's main input when the parent passes it by keyword
            (``None``: the first positional argument).
        output: what the block returns, ``"tensor"``, ``"tuple"`` (its main output first, then others), or
            ``"inputs"`` (one tensor for each of its first ``output_len`` positional arguments, as TNT's blocks take
            and return pixel and patch embeddings); a skipped block returns its input in the same structure (for
            ``"inputs"``: those arguments).
        output_len: length of the tuple a ``"tuple"`` or ``"inputs"`` block returns.
        kind: ``"block"``: a module that is residual as a whole (skipped: it returns its input); ``"branch"``: a
            module whose output its block only adds to a shortcut (``x = shortcut + attn(x)``; skipped: it returns
            zeros, so the add gives the shortcut). Configs saved before branches existed load as ``"block"``.
    """

    name: str
    gateable: bool = True
    input_kwarg: str | None = None
    output: str = "tensor"
    output_len: int = 1
    kind: str = "block"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ConfigError(f"block {self.name!r}: output must be one of {OUTPUTS}, got {self.output!r}")
        if self.kind not in UNIT_KINDS:
            raise ConfigError(f"block {self.name!r}: kind must be one of {UNIT_KINDS}, got {self.kind!r}")
        if self.kind == "branch" and (not self.gateable or self.output != "tensor"):
            raise ConfigError(
                f"branch {self.name!r} must be gateable and return a tensor (a skipped branch returns zeros of its "
                "output's shape); the config was edited by hand: wrap the model again"
            )

    def describe(self) -> dict[str, Any]:
        """The fields as a dict, ``kind`` left out for blocks.

        :meth:`AdaptiveDepthConfig.structure_digest` hashes this form, so that the digests of models saved before
        branches existed stay valid.
        """
        described = asdict(self)
        if self.kind == "block":
            del described["kind"]
        return described


@dataclass
class StageSpec:
    """A maximal run of consecutive blocks at one resolution and width."""

    name: str
    blocks: list[BlockSpec]

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in self.blocks]
        if not any(b.gateable for b in self.blocks):
            raise ConfigError(f"stage {self.name!r} has no gateable block; drop it from the stage list")
        kinds = sorted({b.kind for b in self.blocks})
        if len(kinds) > 1:
            raise ConfigError(
                f"stage {self.name!r} mixes blocks and branches; a stage gates one or the other: split it in two"
            )

    @property
    def kind(self) -> str:
        """``"block"`` (the stage gates whole blocks) or ``"branch"`` (residual branches inside its blocks)."""
        return self.blocks[0].kind if self.blocks else "block"

    @property
    def num_blocks(self) -> int:
        """All blocks of the stage, fixed ones included."""
        return len(self.blocks)

    @property
    def num_fixed(self) -> int:
        """Blocks that always run."""
        return sum(not b.gateable for b in self.blocks)

    @property
    def gateable(self) -> list[bool]:
        """One flag per block: can it be skipped?"""
        return [b.gateable for b in self.blocks]


@dataclass
class BaseModelRef:
    """How to rebuild the wrapped model's architecture without downloading its original weights.

    Args:
        source: ``"timm"``, ``"transformers"`` or ``"module"`` (a module the user built; pass it again with
            ``AdaptiveDepth.from_pretrained(path, model=...)``).
        name: timm architecture (with pretrained tag) or Hub id the weights came from, for the model card.
        architecture: timm architecture name, or transformers class name.
        model_args: keyword arguments for ``timm.create_model`` (``num_classes``, ``in_chans``...).
        hf_config: the transformers config as a dict.
        pretrained: whether the weights started from ``name``'s pretrained weights (False: random init).
        trained_head: whether the classifier is already trained for the model's classes (it came with the pretrained
            weights, or the model was fine-tuned): training then keeps it in every copy (Leader, second Teammate)
            instead of starting them from fresh heads.
        pretrained_cfg: timm only: the preprocessing of the weights (mean, std, interpolation, crop, the input size
            the model was fine-tuned at) and the class names, restored on the rebuilt model.
        license: the licence of the base weights (timm's ``pretrained_cfg``), for the model card.
    """

    source: str
    name: str | None = None
    architecture: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] | None = None
    pretrained: bool = True
    trained_head: bool = False
    pretrained_cfg: dict[str, Any] | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        if self.source not in BASE_SOURCES:
            raise ConfigError(f"base_model.source must be one of {BASE_SOURCES}, got {self.source!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _size(name: str, value: object) -> list[int]:
    """``[C, H, W]`` as three positive ints, or a :class:`ConfigError` that quotes ``value``."""
    if not isinstance(value, list | tuple) or len(value) != 3 or not all(_is_count(v) for v in value):
        raise ConfigError(
            f"{name} must be [channels, height, width], three positive integers (e.g. [3, 224, 224]), got {value!r}"
        )
    return [int(v) for v in value]


def _flops(value: object) -> dict[str, float]:
    """The FLOPs cache with canonical depth keys; a key that is no scaling factor or a count that is no finite,
    non-negative number is a :class:`ConfigError`."""
    if not isinstance(value, dict):
        raise ConfigError(f"config flops must map scaling factors to FLOPs, got {value!r:.200}")
    out: dict[str, float] = {}
    for key, count in value.items():
        try:
            s = check_scaling_factor(float(key))
        except (TypeError, ValueError, ScalingFactorError) as e:
            raise ConfigError(f"config flops has the key {key!r}, which is no scaling factor in (0, 1]") from e
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or not math.isfinite(count) or count < 0:
            raise ConfigError(
                f"config flops[{key!r}] must be a finite, non-negative number of FLOPs, got {count!r}; delete the "
                "entry (it is counted again when asked for) or save the model again"
            )
        out[depth_key(s)] = count
    return out


def _labels(value: object) -> dict[str, str]:
    """Class names as ``{"0": name, ...}``; a list of names is taken in order."""
    if isinstance(value, list):
        value = {str(i): name for i, name in enumerate(value)}
    if not isinstance(value, dict):
        raise ConfigError(f"config id2label must map class indices to names, got {value!r:.200}")
    out: dict[str, str] = {}
    for key, name in value.items():
        if not str(key).isdigit() or not isinstance(name, str | int | float) or isinstance(name, bool):
            raise ConfigError(
                f'config id2label must map class indices ("0", "1"...) to names, got {key!r}: {name!r}; '
                "set class names with model.set_labels([...])"
            )
        out[str(int(key))] = str(name)
    return out


@dataclass
class AdaptiveDepthConfig:
    """Configuration of an :class:`~adaptive_depth.AdaptiveDepth` model.

    Args:
        base_model: how to rebuild the wrapped architecture.
        stages: stages and blocks found by discovery, in execution order.
        policy: which gateable blocks a stage switches off first: ``"last"`` or ``"spread"``.
        scaling_factors: the depths the model is trained / reported at (each in (0, 1]).
        input_size: ``[C, H, W]`` of the example input used for probing and FLOP counts.
        default_scaling_factor: depth the model runs at after loading.
        discovery: how the blocks were found: ``"metadata"``, ``"probe"`` or ``"override"``.
        flops: FLOPs of one forward pass (batch 1, ``flops_input_size``) at each scaling factor, keyed by
            ``depth_key(s)``: a cache, counted again when asked for at another input size.
        flops_input_size: the ``input_size`` the cached ``flops`` were counted at.
        flops_revision: how the cached ``flops`` were counted (``adaptive_depth.flops.COUNTING_REVISION``); a cache
            counted otherwise (or before this was recorded) is counted again.
        norm_stats: scaling factors with their own BatchNorm statistics (saved in ``depth_norms.safetensors``).
        latency_profile: latency per trained depth measured by ``AdaptiveDepth.profile`` on a device
            (a :class:`~adaptive_depth.budget.LatencyProfile` as a dict), used by ``set_budget``.
        id2label: class index (as a string, JSON keys are strings) -> class name, set by ``set_labels``.
        image_processor: a transformers image processor is saved beside the model (``preprocessor_config.json``).
        extra: free-form metadata (training report, latency profile...).
        files: fingerprints of the other files saved with this config, by name: the save's id for safetensors files
            (also in their metadata), the SHA-256 of the bytes for JSON files. Written by ``save_pretrained``; a file
            that does not match belongs to another save and is refused.
        model_type: always ``"adaptive-depth"``: the key transformers' Auto classes read, so that they name this
            library when given a saved model (see ``adaptive_depth.auto_classes``).
    """

    base_model: BaseModelRef
    stages: list[StageSpec]
    policy: str = "last"
    scaling_factors: list[float] = field(default_factory=lambda: list(DEFAULT_SCALING_FACTORS))
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])
    default_scaling_factor: float = 1.0
    discovery: str = "metadata"
    flops: dict[str, float] = field(default_factory=dict)
    flops_input_size: list[int] | None = None
    flops_revision: int | None = None
    norm_stats: list[float] = field(default_factory=list)
    latency_profile: dict[str, Any] | None = None
    id2label: dict[str, str] = field(default_factory=dict)
    image_processor: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    library_name: str = LIBRARY_NAME
    format_version: int = FORMAT_VERSION
    library_version: str = ""
    model_type: str = LIBRARY_NAME

    def __post_init__(self) -> None:
        if isinstance(self.base_model, dict):
            self.base_model = BaseModelRef(**self.base_model)
        if not isinstance(self.base_model, BaseModelRef):
            raise ConfigError(
                f"base_model must describe the wrapped model (source, architecture...), got {self.base_model!r}"
            )
        if not isinstance(self.stages, list) or not all(isinstance(s, StageSpec | dict) for s in self.stages):
            raise ConfigError(f"stages must be a list of {{name, blocks}} objects, got {self.stages!r:.200}")
        self.stages = [s if isinstance(s, StageSpec) else StageSpec(**s) for s in self.stages]
        if not isinstance(self.base_model.model_args, dict):
            raise ConfigError(f"base_model.model_args must be an object, got {self.base_model.model_args!r}")
        if not self.stages:
            raise ConfigError("a config needs at least one stage with a gateable block")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not self.scaling_factors:
            raise ConfigError("scaling_factors must hold at least one value in (0, 1], e.g. [0.5, 1.0]")
        self.scaling_factors = sorted({check_scaling_factor(s) for s in self.scaling_factors})
        self.default_scaling_factor = check_scaling_factor(self.default_scaling_factor)
        self.norm_stats = sorted({check_scaling_factor(s) for s in self.norm_stats})
        if self.latency_profile is not None:  # validated here, kept as plain JSON
            self.latency_profile = LatencyProfile.from_dict(self.latency_profile).to_dict()
        self.input_size = _size("input_size", self.input_size)
        if self.flops_input_size is not None:
            self.flops_input_size = _size("flops_input_size", self.flops_input_size)
        elif self.flops:
            self.flops = {}  # counted before the cache recorded its input size: count again, at today's
        self.flops = _flops(self.flops)
        self.id2label = _labels(self.id2label)
        if not isinstance(self.files, dict) or not all(isinstance(v, str) for v in self.files.values()):
            raise ConfigError(f"config files must map file names to fingerprints, got {self.files!r:.200}")
        if self.library_name != LIBRARY_NAME:
            raise ConfigError(f"not an {LIBRARY_NAME} config (library_name={self.library_name!r})")
        if not self.library_version:
            from . import __version__

            self.library_version = __version__

    def current_flops(self) -> dict[str, float]:
        """The FLOPs cache (``flops``), emptied first if it was counted at another ``input_size`` than today's or by
        another revision of the counting."""
        if self.flops_input_size != self.input_size or self.flops_revision != COUNTING_REVISION:
            self.flops = {}
            self.flops_input_size, self.flops_revision = list(self.input_size), COUNTING_REVISION
        return self.flops

    def structure_digest(self) -> str:
        """A digest of what the saved weights depend on: stages and blocks, policy, recalibrated depths.

        Saved in the weights file's metadata; a config whose digest differs was edited after the save.
        """
        described = {
            "stages": [{"name": s.name, "blocks": [b.describe() for b in s.blocks]} for s in self.stages],
            "policy": self.policy,
            "norm_stats": [depth_key(s) for s in self.norm_stats],
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def num_gateable(self) -> int:
        """Number of blocks (and branches) that can be skipped."""
        return sum(b.gateable for s in self.stages for b in s.blocks)

    @property
    def gates_branches(self) -> bool:
        """True if some stage gates residual branches inside blocks instead of whole blocks."""
        return any(s.kind == "branch" for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    def to_json_string(self) -> str:
        """Sorted, indented JSON (diff-friendly)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptiveDepthConfig:
        """Build from a dict; keys from a newer version are dropped with a warning, not an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"an {LIBRARY_NAME} config must be a JSON object, got {type(data).__name__}")
        if data.get("library_name") != LIBRARY_NAME:
            raise ConfigError(
                f"this config.json is not an {LIBRARY_NAME} config (library_name={data.get('library_name')!r})"
            )
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(
                f"config format_version must be a positive integer, got {version!r}; save the model again"
            )
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version!r} is newer than this library understands ({FORMAT_VERSION}); "
                f"upgrade with `pip install -U {LIBRARY_NAME}`"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown config keys %s (saved by a newer %s?)", unknown, LIBRARY_NAME)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, AttributeError) as e:  # a missing field, a wrong type where an object belongs
            raise ConfigError(f"invalid {LIBRARY_NAME} config: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write ``to_json_string()`` to ``path``."""
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> AdaptiveDepthConfig:
        """Read a config written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, save it again") from e
        return cls.from_dict(data)

    @staticmethod
    def is_adaptive_depth_dict(data: object) -> bool:
        """True if a parsed ``config.json`` was written by this library."""
        return isinstance(data, dict) and data.get("library_name") == LIBRARY_NAME
