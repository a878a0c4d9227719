"""Images of every bit depth reach the model on the 8-bit scale it was trained on: a 16-bit PNG is scaled, not clipped,
whether PIL or ``datasets`` decoded it."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_depth.preprocessing import IMAGENET_MEAN, IMAGENET_STD, convert_image, create_transform

CONFIG = {
    "input_size": (3, 32, 32),
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@pytest.fixture
def png16(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A real 16-bit greyscale PNG written by PIL: a gradient over the whole 16-bit range."""
    values = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    path = tmp_path / "gradient16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what PIL decodes it as
    return path, values


def _eight_bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray((values / 257).round().astype(np.uint8)).convert("RGB")


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(png16) -> None:
    path, values = png16
    transform = create_transform(CONFIG)
    with Image.open(path) as image:
        got = transform(image)
        assert len(np.unique(np.asarray(convert_image(image)))) == 256  # PIL's convert leaves a handful of values
    torch.testing.assert_close(got, transform(_eight_bit(values)), rtol=0, atol=0)
    grey = create_transform({**CONFIG, "input_size": (1, 32, 32)})  # a one-channel model: straight to 8-bit grey
    with Image.open(path) as image:
        assert grey(image).shape == (1, 32, 32) and len(torch.unique(grey(image))) > 200


def test_training_data_decoded_by_datasets_is_scaled_too(png16) -> None:
    path, values = png16
    ds = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
    decoded = ds[0]["image"]
    assert decoded.mode == "I;16"
    transform = pickle.loads(pickle.dumps(create_transform(CONFIG, training=False)))  # as DataLoader workers get it
    torch.testing.assert_close(transform(decoded), create_transform(CONFIG)(_eight_bit(values)), rtol=0, atol=0)


def test_32_bit_integer_and_float_images() -> None:
    ints = Image.fromarray(np.full((4, 4), 65535, dtype=np.int32))
    assert np.asarray(convert_image(ints)).max() == 255  # the 16-bit scale, as 16-bit PNGs open on older PIL
    unit = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    assert np.asarray(convert_image(unit, "L")).tolist()[3][3] == 255 and len(np.unique(convert_image(unit, "L"))) == 16
    wide = Image.fromarray(np.linspace(0, 255, 16, dtype=np.float32).reshape(4, 4))
    assert np.asarray(convert_image(wide, "L")).max() == 255
