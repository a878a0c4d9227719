"""Serving a depth-switchable model under load.

:mod:`~adaptive_depth.serving.controller` is the depth controller: a pure policy object, no server in it, with
no dependency beyond the core install; :class:`ImageClassifier` is one serving worker's model and policy, for any
server. The servers built on it need the ``serve`` extra
(``pip install adaptive-depth[serve]``): :mod:`~adaptive_depth.serving.server` (LitServe: one machine, dynamic
batching, ``examples/serve.py``) and :mod:`~adaptive_depth.serving.ray_serve` (Ray Serve: replicas on many
machines).
"""

from .classifier import ImageClassifier, PolicySpec
from .controller import ControllerStats, Decision, DepthController, DepthPolicy, FixedDepth
from .requests import BadRequestError

__all__ = [
    "BadRequestError",
    "ControllerStats",
    "Decision",
    "DepthController",
    "DepthPolicy",
    "FixedDepth",
    "ImageClassifier",
    "PolicySpec",
]
