"""Image-classification data through ``datasets``: the embedded datasets, any Hub dataset id, or an image folder.

Columns and splits are detected, every image is decoded once before training (so a broken file is named before
the first step). ``loaders.py`` turns the result into seeded PyTorch loaders, with the model's own preprocessing
(:func:`adaptive_depth.preprocessing.build_transform`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image

from ..errors import DataError
from .embedded import DIGITS, EMBEDDED_DATASETS, load_embedded
from .labels import is_label_value, label_kind, labeled_eval_split, training_classes

__all__ = ["ImageClassificationData", "find_bad_images", "load_image_classification_data"]

logger = logging.getLogger(__name__)

LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")
EVAL_SPLITS = ("validation", "valid", "val", "test")
FORMS = (
    f"{' / '.join(map(repr, EMBEDDED_DATASETS))} (embedded), 'imagefolder:PATH' (a folder of class subfolders), "
    "or a Hub dataset id"
)


@dataclass
class ImageClassificationData:
    """Raw train / eval splits and what was detected about them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    num_classes: int
    class_names: list[str]
    image_column: str
    label_column: str
    source: str
    train_split: str = "train"
    eval_split: str | None = None  # None: held out of the training split

    @property
    def eval_source(self) -> str:
        """Where the evaluation images come from: a split's name, or ``"<train split> (held out)"``."""
        return self.eval_split or f"{self.train_split} (held out)"


def _load(spec: str, cache_dir: str | None) -> datasets.DatasetDict:
    if spec in EMBEDDED_DATASETS:
        return load_embedded(spec)
    try:
        if spec.startswith("imagefolder:"):
            path = Path(spec.removeprefix("imagefolder:")).expanduser()
            if not path.is_dir():
                raise DataError(f"{spec!r}: {path} is not a folder; pass imagefolder:PATH with class subfolders")
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(spec, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (not found, offline, bad files): one clear message
        offline = (
            " It is not in the local cache and the Hub cannot be reached (offline)."
            if "offline" in str(e).lower() or isinstance(e, ConnectionError)
            else ""
        )
        raise DataError(f"cannot load dataset {spec!r}: {type(e).__name__}: {e}.{offline} Use {FORMS}.") from e
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _named_column(ds: datasets.Dataset, name: str, kind: str, spec: str) -> str:
    if name not in ds.column_names:
        raise DataError(f"{spec}: no {kind} column {name!r}; columns are {ds.column_names}")
    return name


def _image_column(ds: datasets.Dataset, override: str | None, spec: str) -> str:
    if override is not None:
        return _named_column(ds, override, "image", spec)
    found = [name for name, f in ds.features.items() if isinstance(f, datasets.Image)]
    if len(found) != 1:
        what = "no image column" if not found else f"several image columns {found}"
        raise DataError(f"{spec} has {what} (columns {ds.column_names}); name one with --image-column")
    return found[0]


def _label_column(ds: datasets.Dataset, override: str | None, spec: str) -> str:
    if override is not None:
        return _named_column(ds, override, "label", spec)
    found = [name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    found += [n for n in LABEL_NAMES if n in ds.features and n not in found]
    found = [n for n in found if isinstance(ds.features[n], datasets.ClassLabel) or is_label_value(ds.features[n])]
    if not found:
        raise DataError(
            f"{spec} has no label column (a ClassLabel, or an integer or string column named one of {LABEL_NAMES}); "
            f"columns are {ds.column_names}; name it with --label-column"
        )
    return found[0]


def _split(loaded: datasets.DatasetDict, name: str | None, default: Sequence[str], spec: str) -> str | None:
    if name is not None:
        if name not in loaded:
            raise DataError(f"{spec} has no split {name!r}; splits are {list(loaded)}")
        return name
    return next((s for s in default if s in loaded), None)


def load_image_classification_data(
    spec: str = DIGITS,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    check_images: bool = True,
    skip_bad_images: bool = False,
) -> ImageClassificationData:
    """Load an image-classification dataset, detect its image and label columns and check its labels.

    The training labels become classes ``0..K-1``: a ``ClassLabel`` keeps its names; integer or string labels are
    the classes in sorted order, named by their values (``{0, 2, 5}`` are classes 0, 1, 2 named ``"0"``, ``"2"``,
    ``"5"``). A training image without a label (-1) is an error. The evaluation labels are matched to the training
    classes by name (a ``ClassLabel`` listing them in another order is remapped); a label the training split lacks
    is an error, and an evaluation image without a label is left out.

    Args:
        spec: ``"digits"``, ``"imagefolder:PATH"`` or a Hub dataset id.
        image_column, label_column: override the detection.
        train_split: default ``"train"`` (or the only split).
        eval_split: default the first of validation / valid / val / test that has labels (an unlabeled one, such
            as a Hub ``test`` split of -1 labels, is skipped with a warning); without one, ``eval_fraction`` of the
            training split is held out (stratified by label when the labels are a ``ClassLabel``). A split named
            here must have labels.
        max_train_samples, max_eval_samples: keep this many (a seeded random subset).
        check_images: decode every image once, before training, so that a broken file is found (and named) now,
            not at some step of the run (not needed for the embedded datasets).
        skip_bad_images: leave undecodable images out (each one named in a warning) instead of raising.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset must be a non-empty string: {FORMS}")
    for n, limit in (("train", max_train_samples), ("eval", max_eval_samples)):
        if limit is not None and limit < 1:
            raise DataError(f"max_{n}_samples must be a positive integer, got {limit!r}")
    loaded = _load(spec, cache_dir)
    train_name = _split(loaded, train_split, ["train", *list(loaded)[:1]], spec)
    train = loaded[train_name]
    image = _image_column(train, image_column, spec)
    if spec.startswith("imagefolder:") and label_column is None and "label" not in train.features:
        raise DataError(
            f"{spec} has no class subfolders to take labels from (one class folder, or images directly in it); "
            "put each class's images in a subfolder of its own, at least two classes"
        )
    label = _label_column(train, label_column, spec)
    train_kind = label_kind(train.features[label], label, spec)
    train, names = training_classes(train, label, f"{spec} ({train_name!r} split)")
    if len(names) < 2:
        raise DataError(f"{spec} has {len(names)} class(es) in {label!r}; classification needs at least 2")
    evaluation, eval_name = _evaluation_split(loaded, eval_split, train_name, label, names, train_kind, spec)
    if evaluation is None:
        if not 0 < eval_fraction < 1:
            raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        stratify = label if train_kind == "classlabel" else None
        try:
            parts = train.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column=stratify)
        except ValueError as e:  # too few images to hold out a share of every class
            raise DataError(
                f"{spec}: cannot hold out {eval_fraction:.0%} of {len(train)} images for evaluation ({e}); "
                "pass an evaluation split (--eval-split) or more data"
            ) from e
        train, evaluation = parts["train"], parts["test"]
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(evaluation):
        evaluation = evaluation.shuffle(seed=seed).select(range(max_eval_samples))
    if check_images and spec not in EMBEDDED_DATASETS:
        train = _without_bad_images(train, image, f"{spec} ({train_name})", skip_bad_images)
        evaluation = _without_bad_images(evaluation, image, f"{spec} (evaluation)", skip_bad_images)
    return ImageClassificationData(train, evaluation, len(names), names, image, label, spec, train_name, eval_name)


def _evaluation_split(
    loaded: datasets.DatasetDict,
    name: str | None,
    train_name: str,
    label: str,
    train_names: list[str],
    train_kind: str,
    spec: str,
) -> tuple[datasets.Dataset | None, str | None]:
    """The labeled evaluation split and its name; ``(None, None)``: hold out a share of the training split.

    A split named by the user must have labels. Picked automatically, the first of :data:`EVAL_SPLITS` with labels
    is used: an unlabeled one (a Hub ``test`` split whose labels are all -1) is skipped with a warning, since every
    prediction would count as wrong.
    """
    if name is not None:
        name = _split(loaded, name, (), spec)
        if name == train_name:
            return None, None
        evaluation = labeled_eval_split(loaded[name], label, train_names, train_kind, f"{spec} ({name!r} split)")
        if evaluation is None:
            raise DataError(
                f"{spec}: the {name!r} split has no labels (every {label!r} is -1, or it has no such column), so it "
                f"cannot measure accuracy; name a labeled split with --eval-split, or leave --eval-split out to hold "
                f"out a share of {train_name!r}"
            )
        return evaluation, name
    for candidate in EVAL_SPLITS:
        if candidate not in loaded or candidate == train_name:
            continue
        where = f"{spec} ({candidate!r} split)"
        evaluation = labeled_eval_split(loaded[candidate], label, train_names, train_kind, where)
        if evaluation is not None:
            logger.info("%s: evaluating on the %r split", spec, candidate)
            return evaluation, candidate
        logger.warning("%s has no labels (every %r is -1, or none at all): not used for evaluation", where, label)
    return None, None


def find_bad_images(ds: datasets.Dataset, image_column: str, batch_size: int = 256) -> list[tuple[int, str, str]]:
    """Images that cannot be decoded: ``(index, file or "#index", error)`` for each, in order.

    Every image is decoded once (``PIL.Image.load``, which also catches truncated files).
    """
    from tqdm.auto import tqdm

    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    bad = []
    index = 0
    with tqdm(total=len(raw), desc="checking images", leave=False, disable=len(raw) < 5000) as bar:
        for batch in raw.iter(batch_size=batch_size):
            for item in batch[image_column]:
                name = (item or {}).get("path") or f"#{index}"
                try:
                    data = item.get("bytes")
                    with Image.open(io.BytesIO(data) if data else item["path"]) as img:
                        img.load()
                except Exception as e:  # PIL raises many types for broken files: each one is a bad image
                    bad.append((index, str(name), f"{type(e).__name__}: {e}"))
                index += 1
            bar.update(len(batch[image_column]))
    return bad


def _without_bad_images(ds: datasets.Dataset, image_column: str, where: str, skip: bool) -> datasets.Dataset:
    bad = find_bad_images(ds, image_column)
    if not bad:
        return ds
    listing = "; ".join(f"{name} ({error})" for _, name, error in bad[:10]) + (" ..." if len(bad) > 10 else "")
    if not skip:
        raise DataError(
            f"{len(bad)} image(s) of {where} cannot be decoded: {listing}. Fix or remove them, or skip them with "
            "--skip-bad-images (skip_bad_images=True)"
        )
    logger.warning("skipping %d undecodable image(s) of %s: %s", len(bad), where, listing)
    drop = {i for i, _, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in drop])
