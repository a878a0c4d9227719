"""The model card (``README.md``) of an export: what it holds and the code that loads it without adaptive-depth."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard

from .config import BaseModelRef
from .saved import CARD_MARKER

__all__ = ["export_card"]

_TIMM_REPO = 'model = timm.create_model("hf-hub:<this repo>", pretrained=True)  # or "local-dir:<this folder>"'
_TRANSFORMERS_REPO = 'classify = transformers.pipeline("image-classification", model="<this repo or folder>")'

_ONNX = """import json
import numpy as np
import onnxruntime as ort
from PIL import Image
from transformers import AutoImageProcessor

folder = "<this folder>"  # huggingface_hub.snapshot_download("<this repo>") for the Hub copy
session = ort.InferenceSession(f"{{folder}}/model.onnx")
processor = AutoImageProcessor.from_pretrained(folder)  # the model's own preprocessing
pixel_values = processor(Image.open("image.jpg").convert("RGB"), return_tensors="pt")["pixel_values"].numpy()
logits = session.run(None, {{{feeds}}})[0]
id2label = json.load(open(f"{{folder}}/config.json")).get("id2label", {{}})
print(id2label.get(str(int(logits.argmax())), int(logits.argmax())))"""

_PROGRAM = """import torch

program = torch.export.load("<this folder>/model.pt2")  # unpickles its weights: load files you trust only
logits = program.module()({args})  # pixel_values: preprocessed as config.json says"""


def export_card(base: BaseModelRef, format: str, description: dict[str, Any]) -> ModelCard:
    """The card of an export of ``base`` in ``format`` (see ``adaptive_depth.export_repo``).

    Args:
        base: the wrapped model's reference (name, source).
        format: ``"repo"``, ``"onnx"`` or ``"torch.export"``.
        description: ``ExportPlan.describe()``: inputs and depths.
    """
    depths = description["depths"]
    all_depths = "depth_index" in description["inputs"]
    name = base.name or base.architecture
    if all_depths:
        rows = "\n".join(f"| {d['depth_index']} | {d['scaling_factor']} | {d['blocks_per_stage']} |" for d in depths)
        what = (
            "Every trained depth of a depth-switchable model made with adaptive-depth, in one graph: the input "
            "`depth_index` (an int64 scalar) chooses the depth, weights are stored once, and the blocks a depth "
            "skips are not computed.\n\n| depth_index | scaling factor | blocks per stage |\n|---|---|---|\n" + rows
        )
        title = f"{name}, every trained depth"
    else:
        title = f"{name}, {depths[0]['blocks_per_stage']} blocks per stage"
        what = "One fixed depth of a depth-switchable model made with adaptive-depth: the skipped blocks are removed."
    if format == "repo":
        library, code = base.source, _TIMM_REPO if base.source == "timm" else _TRANSFORMERS_REPO
        how = f"It is a plain {base.source} model and loads with {base.source} alone."
    elif format == "onnx":
        feeds = '"pixel_values": pixel_values' + (', "depth_index": np.array(0)' if all_depths else "")
        library, code = "onnx", _ONNX.format(feeds=feeds)
        fixed = description.get("batch_size")
        batch = "dynamic batch" if fixed is None else f"a batch of {fixed} only: the architecture has no dynamic batch"
        how = f"An ONNX file (`model.onnx`, {batch}) with its preprocessing and class names beside it."
    else:
        args = "pixel_values, torch.tensor(0)" if all_depths else "pixel_values"
        library, code = "pytorch", _PROGRAM.format(args=args)
        how = "A `torch.export` program (`model.pt2`, dynamic batch): ExecuTorch and AOTInductor start from it."
    return ModelCard(
        f"""---
library_name: {library}
pipeline_tag: image-classification
tags: [adaptive-depth, image-classification, {base.source}]
---

# {title}

{what}

{how}

```python
{code}
```

{CARD_MARKER}
"""
    )
