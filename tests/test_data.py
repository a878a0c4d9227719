"""Data through ``datasets``: digits, image folders, column detection, transforms, seeded augmentation."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

from adaptive_depth import DataError
from adaptive_depth.training import (
    EpochSampler,
    TransformedDataset,
    build_transform,
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
