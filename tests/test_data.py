"""Data through ``datasets``: digits, image folders, column detection, transforms, seeded augmentation."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

from adaptive_depth import DataError
from adaptive_depth.preprocessing import build_transform
from adaptive_depth.training import (
    EpochSampler,
    TransformedDataset,
    cluttered_digits_dataset,
    digit_pairs_dataset,
    digits_dataset,
    load_image_classification_data,
)


def test_digits_is_a_stratified_datasets_split() -> None:
    digits = digits_dataset()
    assert (len(digits["train"]), len(digits["test"])) == (1437, 360)
    assert isinstance(digits["train"].features["image"], datasets.Image)
    assert digits["train"].features["label"].names == [str(i) for i in range(10)]
    assert set(digits["test"]["label"]) == set(range(10))
    image = digits["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    data = load_image_classification_data("digits", max_train_samples=100)
    assert (data.num_classes, data.image_column, data.label_column, len(data.train)) == (10, "image", "label", 100)


def test_imagefolder_detects_columns_and_classes(image_folder: Path) -> None:
    data = load_image_classification_data(f"imagefolder:{image_folder}", eval_fraction=0.25)
    assert data.class_names == ["kind0", "kind1", "kind2"]
    assert (data.image_column, data.label_column) == ("image", "label")
    assert len(data.train) + len(data.eval) == 12 and len(data.eval) == 3


def test_column_detection_errors_name_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    img = [Image.new("RGB", (4, 4))] * 10
    features = datasets.Features(
        {"a": datasets.Image(), "b": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])}
    )
    two_images = datasets.Dataset.from_dict({"a": img, "b": img, "label": [0, 1] * 5}, features=features)
    no_label = datasets.Dataset.from_dict(
        {"a": img, "note": ["p"] * 10},
        features=datasets.Features({"a": datasets.Image(), "note": datasets.Value("string")}),
    )
    one_class = datasets.Dataset.from_dict(
        {"a": img, "label": [0] * 10},
        features=datasets.Features({"a": datasets.Image(), "label": datasets.ClassLabel(names=["only"])}),
    )
    table = {"two": two_images, "nolabel": no_label, "oneclass": one_class}
    monkeypatch.setattr(datasets, "load_dataset", lambda spec, **_: datasets.DatasetDict({"train": table[spec]}))
    with pytest.raises(DataError, match="several image columns"):
        load_image_classification_data("two")
    assert load_image_classification_data("two", image_column="b").image_column == "b"
    with pytest.raises(DataError, match=r"columns are \['a', 'b', 'label'\]"):
        load_image_classification_data("two", image_column="c")
    with pytest.raises(DataError, match="no label column"):
        load_image_classification_data("nolabel")
    with pytest.raises(DataError, match="at least 2"):
        load_image_classification_data("oneclass")
    with pytest.raises(DataError, match="cannot hold out"):
        load_image_classification_data("two", image_column="a", eval_fraction=0.05)
    with pytest.raises(DataError, match="no split 'dev'"):
        load_image_classification_data("two", image_column="a", eval_split="dev")


def test_unknown_dataset_offline_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="imagefolder:PATH"):
        load_image_classification_data("no-such-org/no-such-dataset-xyz")


def test_transforms_follow_the_model_and_convert_channels() -> None:
    image = digits_dataset()["train"][0]["image"]
    timm_model = timm.create_model("test_resnet", pretrained=False)
    for train in (True, False):
        assert build_transform(timm_model, train=train, input_size=[3, 32, 32])(image).shape == (3, 32, 32)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    hf = transformers.ViTForImageClassification(config)
    assert build_transform(hf, train=False)(image).shape == (3, 32, 32)
    with pytest.raises(DataError, match="input_size"):
        build_transform(torch.nn.Linear(2, 2), train=False)


def test_augmentation_is_seeded_per_epoch_and_index_and_leaves_the_global_rng_alone() -> None:
    data = digits_dataset()["train"].select(range(4))
    tf = build_transform(timm.create_model("test_resnet"), train=True, input_size=[3, 32, 32])
    ds = TransformedDataset(data, tf, "image", "label", seed=3)
    state = torch.get_rng_state()
    first, again = ds[1][0], ds[1][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], first)
    assert ds[1][1] == data[1]["label"]


def test_epoch_sampler_is_a_seeded_permutation_per_epoch() -> None:
    sampler = EpochSampler(10, shuffle=True, seed=1)
    order0 = list(sampler)
    assert sorted(order0) == list(range(10)) and list(sampler) == order0
    sampler.set_epoch(1)
    assert list(sampler) != order0
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_teammate_streams_draw_their_own_order_and_augmentation() -> None:
    single = list(EpochSampler(12, shuffle=True, seed=1))
    streams = list(EpochSampler(12, shuffle=True, seed=1, streams=2))
    assert [a for a, _ in streams] == single  # stream 0 is the single-stream order
    assert sorted(b for _, b in streams) == list(range(12)) and [b for _, b in streams] != single
    views = list(EpochSampler(12, shuffle=True, seed=1, streams=2, own_order=False))
    assert views == [(i, i) for i in single]
    data = digits_dataset()["train"].select(range(4))
    tf = build_transform(timm.create_model("test_resnet"), train=True, input_size=[3, 32, 32])
    ds = TransformedDataset(data, tf, "image", "label", seed=3, with_index=True)
    pixels, labels, indices = ds[(1, 1)]
    assert pixels.shape == (2, 3, 32, 32) and labels.tolist() == [data[1]["label"]] * 2 and indices.tolist() == [1, 1]
    assert not torch.equal(pixels[0], pixels[1])  # one image, each stream its own augmentation
    assert torch.equal(pixels[0], ds[1][0])  # stream 0 augments as a single stream does
    pixels, labels, _ = ds[(0, 2)]
    assert labels.tolist() == [data[0]["label"], data[2]["label"]]


def test_digit_pairs_read_two_held_out_digits() -> None:
    pairs = digit_pairs_dataset(train_per_class=2, test_per_class=1)
    names = pairs["train"].features["label"].names
    assert len(names) == 55 and names[:3] == ["0+0", "0+1", "0+2"] and names[-1] == "9+9"
    assert pairs["train"]["label"] == [c for c in range(55) for _ in range(2)] and len(pairs["test"]) == 55
    image = np.asarray(pairs["test"][37]["image"])
    assert image.shape == (32, 32) and image[:, :16].any() and image[:, 16:].any()  # a digit in each half
    assert image[:2].max() == image[-2:].max() == image[:, :2].max() == image[:, -2:].max() == 0  # crop-safe margins
    again = digit_pairs_dataset(train_per_class=2, test_per_class=1)
    assert np.array_equal(np.asarray(again["test"][37]["image"]), image)
    assert not np.array_equal(np.asarray(pairs["train"][0]["image"]), np.asarray(pairs["train"][1]["image"]))
    with pytest.raises(DataError, match="digit_size"):
        digit_pairs_dataset(digit_size=20)


def test_cluttered_digits_are_a_harder_split_of_the_same_digits() -> None:
    clutter = cluttered_digits_dataset(views=2)
    digits = digits_dataset()
    # every digit of a split appears `views` times with its label; held-out images come from held-out digits only
    for split in ("train", "test"):
        assert clutter[split]["label"] == [y for y in digits[split]["label"] for _ in range(2)]
    image = clutter["test"][0]["image"]
    assert image.size == (32, 32) and image.mode == "L"
    pixels = [np.asarray(clutter["test"][i]["image"]) for i in range(2)]
    assert not np.array_equal(pixels[0], pixels[1])  # two views of one digit: other place, other clutter
    again = cluttered_digits_dataset(views=2)
    assert np.array_equal(np.asarray(again["test"][5]["image"]), np.asarray(clutter["test"][5]["image"]))
    bare = cluttered_digits_dataset(views=1, fragments=0)["test"][0]["image"]
    assert (np.asarray(bare) > 0).sum() < (pixels[0] > 0).sum()  # the clutter adds strokes
    data = load_image_classification_data("digits-cluttered", max_eval_samples=50)
    assert (data.num_classes, len(data.train), len(data.eval)) == (10, 2874, 50)
    with pytest.raises(DataError, match="canvas >= 28"):
        cluttered_digits_dataset(canvas=16)


# ---------------------------------------------------------------------- labels and evaluation splits


def _splits(monkeypatch: pytest.MonkeyPatch, **splits: tuple[list, object]) -> None:
    """``datasets.load_dataset`` returns these splits: name -> (labels, label feature), a 4x4 image each."""

    def split(labels: list, feature: object) -> datasets.Dataset:
        features = datasets.Features({"image": datasets.Image(), "label": feature})
        return datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4))] * len(labels), "label": labels}, features)

    loaded = datasets.DatasetDict({name: split(*value) for name, value in splits.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda spec, **_: loaded)


def test_labels_that_are_not_0_to_k_minus_1_become_classes_named_by_their_values(monkeypatch) -> None:
    integers = datasets.Value("int64")
    _splits(monkeypatch, train=([0, 2, 5, 5, 2, 0], integers), test=([5, 0, 2], integers))
    data = load_image_classification_data("sparse", check_images=False)
    assert (data.class_names, data.num_classes) == (["0", "2", "5"], 3)
    assert data.train["label"] == [0, 1, 2, 2, 1, 0] and data.eval["label"] == [2, 0, 1]  # label 5 is class 2
    words = datasets.Value("string")
    _splits(monkeypatch, train=(["dog", "cat", "eel", "cat"], words), validation=(["eel", "dog"], words))
    data = load_image_classification_data("words", check_images=False)
    assert data.class_names == ["cat", "dog", "eel"] and data.train["label"] == [1, 0, 2, 0]
    assert data.eval["label"] == [2, 1] and data.eval_source == "validation"
    _splits(monkeypatch, train=([0, 1, -1, 1], datasets.ClassLabel(names=["a", "b"])))
    with pytest.raises(DataError, match=r"1 of 4 training images have no label \(-1 in 'label'\)"):
        load_image_classification_data("holes", check_images=False)
    _splits(monkeypatch, train=([0.5, 1.5], datasets.Value("float32")))
    with pytest.raises(DataError, match="holds Value.*float32.*not class labels"):
        load_image_classification_data("floats", label_column="label", check_images=False)


def test_an_unlabeled_evaluation_split_is_skipped_and_a_named_one_refused(monkeypatch, caplog) -> None:
    names = datasets.ClassLabel(names=["a", "b"])
    train = ([0, 1] * 10, names)
    _splits(monkeypatch, train=train, test=([-1] * 6, names))  # the usual form of a Hub test split
    with caplog.at_level("WARNING"):
        data = load_image_classification_data("hub", check_images=False)
    assert "'test' split) has no labels" in caplog.text
    assert data.eval_split is None and data.eval_source == "train (held out)" and len(data.eval) == 4
    _splits(monkeypatch, train=train, validation=([1, 0, 1], names), test=([-1] * 6, names))
    assert load_image_classification_data("hub", check_images=False).eval_split == "validation"
    with pytest.raises(DataError, match="'test' split has no labels.*leave --eval-split out"):
        load_image_classification_data("hub", eval_split="test", check_images=False)
    _splits(monkeypatch, train=train, test=([1, -1, 0, -1], names))  # partly labeled: the labeled images only
    data = load_image_classification_data("hub", check_images=False)
    assert data.eval_split == "test" and data.eval["label"] == [1, 0]


def test_evaluation_labels_are_matched_to_the_training_classes_by_name(monkeypatch) -> None:
    train = ([0, 1, 2] * 4, datasets.ClassLabel(names=["cat", "dog", "eel"]))
    reordered = datasets.ClassLabel(names=["eel", "cat", "dog"])
    _splits(monkeypatch, train=train, test=([0, 1, 2], reordered))
    assert load_image_classification_data("pets", check_images=False).eval["label"] == [2, 0, 1]
    _splits(monkeypatch, train=train, test=([0, 1], datasets.ClassLabel(names=["cat", "cow"])))
    with pytest.raises(DataError, match=r"'test' split\) has labels the training split lacks: \['cow'\]"):
        load_image_classification_data("pets", check_images=False)
    _splits(monkeypatch, train=train, test=([0, 7], datasets.Value("int64")))  # indices beyond the classes
    with pytest.raises(DataError, match=r"lacks: \['#7'\]"):
        load_image_classification_data("pets", check_images=False)


def test_transforms_and_datasets_pickle_so_spawned_workers_can_load(tmp_path: Path) -> None:
    """``--num-workers > 0`` where workers are spawned (macOS, Windows, Linux from Python 3.14) pickles all of these."""
    from torch.utils.data import DataLoader

    from adaptive_depth import AdaptiveDepth
    from adaptive_depth.training import make_loaders

    model = AdaptiveDepth.wrap(timm.create_model("test_convnext", num_classes=10), input_size=[3, 32, 32])
    image = digits_dataset()["train"][0]["image"]
    for transform in (
        build_transform(model.model, train=True, input_size=[3, 32, 32]),
        build_transform(model.model, train=False, input_size=[3, 32, 32]),
        model.create_transform(),
        model.create_transform(training=True),
    ):
        again = pickle.loads(pickle.dumps(transform))
        outputs = []
        for tf in (transform, again):  # the same augmentation draws from the same seeds
            torch.manual_seed(1)
            random.seed(1)
            outputs.append(tf(image))
        assert torch.equal(*outputs)
    data = load_image_classification_data("digits", max_train_samples=8, max_eval_samples=8)
    loaders = make_loaders(data, model, batch_size=4, seed=0, input_size=[3, 32, 32])
    for loader in (loaders.train, loaders.recalibration, loaders.eval):
        pickle.dumps(loader.dataset)
        pickle.dumps(loader.sampler)
    train = loaders.train
    spawned = DataLoader(
        train.dataset, batch_size=4, sampler=train.sampler, num_workers=1, multiprocessing_context="spawn"
    )
    batches = list(spawned)
    assert len(batches) == 2
    for (images, labels), (expected_images, expected_labels) in zip(batches, train):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)  # same seeded views
