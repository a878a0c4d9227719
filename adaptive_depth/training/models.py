"""The Leader a training run starts from, by name: any timm or transformers architecture, with pretrained weights.

(The Teammates are depth-switchable models: :func:`adaptive_depth.pretrained_or_random` makes them.)
"""

from __future__ import annotations

import os

from torch import nn

from ..base_models import load_base_model
from ..sources import HubOptions, resolve

__all__ = ["load_leader"]


def load_leader(name: str | os.PathLike[str], *, num_classes: int | None = None) -> nn.Module:
    """The plain (not depth-switchable) model ``name`` names, with its pretrained weights, to lead the Teammates.

    Args:
        name: a timm name, a Hub id (timm or transformers) or a local folder; any architecture, also one that has
            nothing to gate.
        num_classes: a new head for this many classes (a Leader trained with the Teammates); ``None`` keeps its own
            head (a fixed teacher, already trained on the task's labels).

    Raises:
        WeightsUnavailableError: its pretrained weights cannot be had (offline, not cached): a Leader from random
            weights would teach noise.
        UnknownModelError: ``name`` is no timm model, Hub repo or folder.
    """
    hub = HubOptions()
    return load_base_model(resolve(name, hub), pretrained=True, hub=hub, num_classes=num_classes).model
