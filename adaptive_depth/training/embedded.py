"""Datasets that ship with the library: built from scikit-learn's bundled digits, so they need no download.

- ``"digits"``: the 1,797 real 8x8 handwritten digits, 10 classes, a stratified 80/20 split.
- ``"digits-cluttered"``: the same digits at 24 px, placed at random among fragments of other digits on a
  32 px canvas (as cluttered MNIST): a harder task on which depth matters.
- ``"digit-pairs"``: two of the digits side by side, 55 classes (which two they are): a many-class task.

and one read from local files that a system package installs (no download either):

- ``"fashion-mnist"``: Zalando's Fashion-MNIST, 60,000 training and 10,000 test photographs of clothing, 28 px
  grey, 10 classes, from its idx files (Debian / Ubuntu: ``apt-get install dataset-fashion-mnist``, which puts them
  in ``/usr/share/datasets/fashion-mnist``; elsewhere set ``ADAPTIVE_DEPTH_FASHION_MNIST`` to their folder).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ..errors import DataError

__all__ = [
    "CLUTTERED_DIGITS",
    "DIGITS",
    "DIGIT_PAIRS",
    "EMBEDDED_DATASETS",
    "FASHION_MNIST",
    "cluttered_digits_dataset",
    "digit_pairs_dataset",
    "digits_dataset",
    "fashion_mnist_dataset",
    "load_embedded",
]

DIGITS = "digits"
CLUTTERED_DIGITS = "digits-cluttered"
DIGIT_PAIRS = "digit-pairs"
FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs it
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def digits_dataset() -> datasets.DatasetDict:
    """scikit-learn's bundled digits (1,797 real 8x8 images, 10 classes) with a stratified 80/20 split (seed 0)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255.0 / 16.0).round().astype(np.uint8), mode="L") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    full = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return full.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")


def _resized_splits(digit_size: int, seed: list[int]) -> Iterator[tuple[str, datasets.Dataset, Any, Any]]:
    """Per split of :func:`digits_dataset`: its name, the split, a generator seeded by ``seed`` and the split, and
    its digits upsampled to ``digit_size`` pixels as one uint8 array ``[N, size, size]``."""
    import numpy as np

    for offset, (name, split) in enumerate(digits_dataset().items()):
        rng = np.random.default_rng([*seed[:1], (seed[1] if len(seed) > 1 else 0) + offset])
        digits = np.stack([np.asarray(img.resize((digit_size, digit_size), Image.BILINEAR)) for img in split["image"]])
        yield name, split, rng, digits


def cluttered_digits_dataset(
    *,
    views: int = 2,
    canvas: int = 32,
    digit_size: int = 24,
    fragments: int = 8,
    fragment_size: int = 6,
    seed: int = 0,
) -> datasets.DatasetDict:
    """A harder 10-class task from the same digits: cluttered, translated digits (as cluttered MNIST).

    Each digit of :func:`digits_dataset`'s split, upsampled to ``digit_size`` pixels, is placed ``views`` times at a
    random position of a ``canvas`` x ``canvas`` image strewn with ``fragments`` random ``fragment_size`` crops of
    other digits of the same split (held-out images are built from held-out digits only), so the network has to tell
    the digit from digit-like strokes. Deterministic for a ``seed``. The defaults were chosen so that regnetx_002
    from random initialisation reaches 91-95% in 10 epochs (99% on plain digits): errors enough to rank methods.
    """
    import numpy as np

    margin = 2  # the evaluation centre crop (87.5%) removes two pixels each side of 32
    if canvas < digit_size + 2 * margin or not 0 < fragment_size <= digit_size or fragments < 0 or views < 1:
        raise DataError(
            f"cluttered digits need canvas >= {digit_size + 2 * margin}, 0 < fragment_size <= {digit_size}, "
            f"fragments >= 0 and views >= 1; got canvas={canvas}, fragment_size={fragment_size}, "
            f"fragments={fragments}, views={views}"
        )
    out = {}
    for name, split, rng, digits in _resized_splits(digit_size, [seed]):
        images, labels = [], []
        for index, label in enumerate(split["label"]):
            for _ in range(views):
                image = np.zeros((canvas, canvas), dtype=np.uint8)
                for other in rng.integers(len(digits), size=fragments):
                    y, x = rng.integers(digit_size - fragment_size + 1, size=2)
                    piece = digits[other, y : y + fragment_size, x : x + fragment_size]
                    top, left = rng.integers(canvas - fragment_size + 1, size=2)
                    window = image[top : top + fragment_size, left : left + fragment_size]
                    np.maximum(window, piece, out=window)
                top, left = rng.integers(margin, canvas - digit_size - margin + 1, size=2)
                window = image[top : top + digit_size, left : left + digit_size]
                np.maximum(window, digits[index], out=window)
                images.append(Image.fromarray(image, mode="L"))
                labels.append(label)
        out[name] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=split.features)
    return datasets.DatasetDict(out)


def digit_pairs_dataset(
    *,
    train_per_class: int = 50,
    test_per_class: int = 20,
    canvas: int = 32,
    digit_size: int = 14,
    seed: int = 0,
) -> datasets.DatasetDict:
    """55 classes: two real handwritten digits in one image, labelled by which two they are (``"0+0"`` .. ``"9+9"``).

    Each image of class ``{a, b}`` (a <= b) holds a random digit ``a`` and a random digit ``b`` of
    :func:`digits_dataset`'s split, in random order, each upsampled to ``digit_size`` pixels and placed with a
    random offset in its half of a ``canvas`` x ``canvas`` image; held-out images are built from held-out digits only,
    so every test image is new handwriting. The network must find and read both digits: a many-class task on which
    depth matters. Deterministic for a ``seed``.
    """
    import numpy as np

    margin = 2  # the evaluation centre crop (87.5%) removes two pixels each side of 32
    half = canvas // 2
    if digit_size + margin > half or train_per_class < 1 or test_per_class < 1:
        raise DataError(
            f"digit pairs need digit_size + {margin} <= canvas / 2 and at least one image per class; got "
            f"canvas={canvas}, digit_size={digit_size}, train_per_class={train_per_class}, "
            f"test_per_class={test_per_class}"
        )
    pairs = [(a, b) for a in range(10) for b in range(a, 10)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"{a}+{b}" for a, b in pairs])}
    )
    out = {}
    for name, split, rng, digits in _resized_splits(digit_size, [seed, 100]):
        by_label = [np.flatnonzero(np.asarray(split["label"]) == d) for d in range(10)]
        per_class = train_per_class if name == "train" else test_per_class
        images, labels = [], []
        for label, pair in enumerate(pairs):
            for _ in range(per_class):
                image = np.zeros((canvas, canvas), dtype=np.uint8)
                for place, digit in enumerate(rng.permutation(pair)):
                    top = rng.integers(margin, canvas - digit_size - margin + 1)
                    lo, hi = (margin, half - digit_size) if place == 0 else (half, canvas - margin - digit_size)
                    left = rng.integers(lo, hi + 1)
                    image[top : top + digit_size, left : left + digit_size] = digits[rng.choice(by_label[digit])]
                images.append(Image.fromarray(image, mode="L"))
                labels.append(label)
        out[name] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(out)


def _read_idx(path: Path) -> Any:
    """An idx file (the MNIST format: a magic number with the element type and rank, the sizes, the data) as a
    uint8 numpy array; gzipped or not."""
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (its header is {data[:4]!r})")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: its header promises {shape}, it holds {values.size} values")
    return values.reshape(shape)


def fashion_mnist_dataset(folder: str | os.PathLike[str] | None = None) -> datasets.DatasetDict:
    """Fashion-MNIST from its idx files: ``train`` (60,000) and ``test`` (10,000), 28 px grey, 10 named classes.

    Args:
        folder: where ``train-images-idx3-ubyte[.gz]`` and the three other files are (default:
            ``$ADAPTIVE_DEPTH_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``).

    Raises:
        DataError: the files are not there (the message names the package that installs them), or are broken.
    """
    root = Path(folder or os.environ.get("ADAPTIVE_DEPTH_FASHION_MNIST") or FASHION_MNIST_DIR)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise DataError(
            f"Fashion-MNIST's {stem}[.gz] is not in {root}. Install it with `apt-get install dataset-fashion-mnist` "
            "(Debian / Ubuntu), or download the four idx files of github.com/zalandoresearch/fashion-mnist into a "
            "folder and set ADAPTIVE_DEPTH_FASHION_MNIST to it"
        )

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= 10:
            raise DataError(
                f"Fashion-MNIST's {split} files in {root} do not match: images {images.shape}, labels {labels.shape} "
                f"(10 classes expected)"
            )
        pil = [Image.fromarray(image, mode="L") for image in images]
        out[split] = datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)
    return datasets.DatasetDict(out)


_BUILDERS = {
    DIGITS: digits_dataset,
    CLUTTERED_DIGITS: cluttered_digits_dataset,
    DIGIT_PAIRS: digit_pairs_dataset,
    FASHION_MNIST: fashion_mnist_dataset,
}
EMBEDDED_DATASETS = tuple(_BUILDERS)


def load_embedded(name: str) -> datasets.DatasetDict:
    """The built-in dataset ``name`` (one of :data:`EMBEDDED_DATASETS`), with ``train`` and ``test`` splits."""
    if name not in _BUILDERS:
        raise DataError(f"no embedded dataset {name!r}; the embedded ones are {list(EMBEDDED_DATASETS)}")
    return _BUILDERS[name]()
