"""Fashion-MNIST read by name from its idx files (as Debian's dataset-fashion-mnist installs them)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from adaptive_depth.errors import DataError
from adaptive_depth.training import load_image_classification_data


def _idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    _idx(tmp_path / "train-images-idx3-ubyte", images)
    _idx(tmp_path / "train-labels-idx1-ubyte", labels)
    _idx(tmp_path / "t10k-images-idx3-ubyte", images[:10], compress=False)  # plain files are read too
    _idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:10], compress=False)
    monkeypatch.setenv("ADAPTIVE_DEPTH_FASHION_MNIST", str(tmp_path))
    return tmp_path, images


def test_fashion_mnist_loads_by_name_with_its_class_names_and_pixels(fashion) -> None:
    _, images = fashion
    data = load_image_classification_data("fashion-mnist")
    assert (len(data.train), len(data.eval), data.num_classes) == (30, 10, 10)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    first = data.train[0]
    assert np.array_equal(np.asarray(first["image"]), images[0]) and first["label"] == 0


def test_missing_or_broken_fashion_mnist_says_how_to_install_it(fashion, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTIVE_DEPTH_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_image_classification_data("fashion-mnist")
    folder, _ = fashion
    monkeypatch.setenv("ADAPTIVE_DEPTH_FASHION_MNIST", str(folder))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + (99).to_bytes(4, "big") + b"\0")
    with pytest.raises(DataError, match="truncated"):
        load_image_classification_data("fashion-mnist")
