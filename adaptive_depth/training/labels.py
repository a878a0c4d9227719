"""Class labels of an image-classification dataset: the training split's as classes ``0..K-1`` with their names, the
evaluation split's matched to them by name.

A label the model cannot learn or be scored on is found here, before training: a training image without a label, an
evaluation label of a class the training split lacks. Images without a label (``-1``, how a ``ClassLabel`` marks a
missing one, as in most Hub ``test`` splits) are left out of evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from ..errors import DataError

__all__ = ["is_label_value", "is_unlabeled", "label_kind", "labeled_eval_split", "training_classes"]

logger = logging.getLogger(__name__)


def is_unlabeled(value: Any) -> bool:
    """``-1`` (how a ``ClassLabel`` marks a missing label, e.g. in most Hub ``test`` splits) or no value at all."""
    return value is None or value == -1


def is_label_value(feature: Any) -> bool:
    """An integer or string column: one that can hold class labels without being a ``ClassLabel``."""
    dtype = getattr(feature, "dtype", "") if isinstance(feature, datasets.Value) else ""
    return dtype.startswith(("int", "uint")) or dtype in ("string", "large_string")


def label_kind(feature: Any, column: str, where: str) -> str:
    """``"classlabel"``, ``"int"`` or ``"string"``; any other column type cannot hold class labels."""
    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    if is_label_value(feature):
        return "int" if feature.dtype.startswith(("int", "uint")) else "string"
    raise DataError(
        f"{where}: label column {column!r} holds {feature}, not class labels; name a ClassLabel, integer or string "
        "column with --label-column"
    )


class _LabelIndex:
    """Maps a split's label values to the training classes' indices; a picklable callable, so ``datasets`` can hash
    it for its cache."""

    def __init__(self, column: str, index: dict[Any, int]) -> None:
        self.column, self.index = column, index

    def __call__(self, values: list[Any]) -> dict[str, list[int]]:
        return {self.column: [self.index[v] for v in values]}


def _relabel(ds: datasets.Dataset, column: str, index: dict[Any, int], names: list[str]) -> datasets.Dataset:
    features = ds.features.copy()
    features[column] = datasets.ClassLabel(names=names)
    return ds.map(
        _LabelIndex(column, index), batched=True, input_columns=[column], features=features, desc="labels to classes"
    )


def training_classes(train: datasets.Dataset, label: str, where: str) -> tuple[datasets.Dataset, list[str]]:
    """The training split with labels ``0..K-1`` and the class names, or a :class:`DataError` saying what is wrong.

    A ``ClassLabel`` keeps its names. Integer or string labels become the classes in sorted order, named by their
    values (labels ``{0, 2, 5}`` are classes 0, 1, 2 named ``"0"``, ``"2"``, ``"5"``), so a cross-entropy never
    sees a target outside its logits.
    """
    kind = label_kind(train.features[label], label, where)
    values = train.unique(label)
    unlabeled = [v for v in values if is_unlabeled(v)]
    if unlabeled:
        count = sum(1 for v in train[label] if is_unlabeled(v))
        raise DataError(
            f"{where}: {count} of {len(train)} training images have no label ({unlabeled[0]!r} in {label!r}); "
            "train on a labeled split (--train-split), or remove those images"
        )
    if kind == "classlabel":
        return train, list(train.features[label].names)
    if kind == "int" and min(values) < 0:
        raise DataError(f"{where}: labels in {label!r} must be >= 0, got {sorted(values)[:5]}")
    ordered = sorted(values)
    names = [str(v) for v in ordered]
    if ordered != list(range(len(ordered))):  # not 0..K-1 already: each value becomes its class's index
        log = logger.warning if kind == "int" else logger.info  # string labels always need it; numbers, seldom
        log(
            "%s: the %d distinct labels of %r (%s) become classes 0..%d in sorted order, named by their values",
            where,
            len(ordered),
            label,
            ", ".join(map(repr, ordered[:5])) + (", ..." if len(ordered) > 5 else ""),
            len(ordered) - 1,
        )
        train = _relabel(train, label, {v: i for i, v in enumerate(ordered)}, names)
    return train, names


def _eval_names(ds: datasets.Dataset, label: str, train_names: list[str], train_kind: str, where: str) -> list[Any]:
    """Each evaluation label as a training class's name (``None``: unlabeled), read the way its column stores it."""
    kind = label_kind(ds.features[label], label, where)
    values = ds[label]
    if kind == "classlabel":
        names = ds.features[label].names
        return [None if is_unlabeled(v) else names[v] for v in values]
    if kind == "int" and train_kind == "classlabel":  # plain indices into the training classes
        return [None if is_unlabeled(v) else train_names[v] if 0 <= v < len(train_names) else f"#{v}" for v in values]
    return [None if v is None or (kind == "int" and v == -1) else str(v) for v in values]


def labeled_eval_split(
    evaluation: datasets.Dataset, label: str, train_names: list[str], train_kind: str, where: str
) -> datasets.Dataset | None:
    """The evaluation split with the training classes' indices, its unlabeled images left out; ``None`` when no
    image has a label. Labels of classes the training split lacks are a :class:`DataError` (every such image would
    count as an error)."""
    if label not in evaluation.column_names:
        return None
    names = _eval_names(evaluation, label, train_names, train_kind, where)
    labeled = [i for i, n in enumerate(names) if n is not None]
    if not labeled:
        return None
    outside = sorted({n for n in names if n is not None} - set(train_names))
    if outside:
        raise DataError(
            f"{where} has labels the training split lacks: {outside[:10]}{' ...' if len(outside) > 10 else ''} "
            f"(training classes: {train_names[:10]}{' ...' if len(train_names) > 10 else ''}); every such image "
            "would count as an error. Evaluate on a split with the training classes (--eval-split), or leave "
            "--eval-split out to hold out a share of the training split"
        )
    if len(labeled) < len(names):
        logger.warning(
            "%s: %d of %d images have no label; evaluating on the %d labeled ones",
            where,
            len(names) - len(labeled),
            len(names),
            len(labeled),
        )
        evaluation = evaluation.select(labeled)
        names = [names[i] for i in labeled]
    feature = evaluation.features[label]
    if isinstance(feature, datasets.ClassLabel) and list(feature.names) == train_names:
        return evaluation
    if isinstance(feature, datasets.ClassLabel) and set(feature.names) != set(train_names):
        logger.info("%s: its classes are matched to the training classes by name", where)
    elif isinstance(feature, datasets.ClassLabel):
        logger.warning("%s: its ClassLabel lists the training classes in another order: matched by name", where)
    position = {n: i for i, n in enumerate(train_names)}
    index = {v: position[n] for v, n in zip(evaluation[label], names)}
    if not isinstance(feature, datasets.ClassLabel) and all(k == i for k, i in index.items()):
        return evaluation  # integer labels that already are the training classes' indices
    return _relabel(evaluation, label, index, train_names)
