"""Per-depth BatchNorm statistics are checked on held-out training images and never lose to those of training."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from adaptive_depth import AdaptiveDepth
from adaptive_depth.norms import batchnorm_layers
from adaptive_depth.training import TrainingConfig, load_image_classification_data, make_loaders
from adaptive_depth.training.norm_check import RECALIBRATED, TRAINING, keep_better_norms

SIZE = [3, 32, 32]


def _images(loader) -> set[int]:
    return {int(i) for batch in loader for i in batch[2]}


def test_the_check_images_are_held_out_of_training_and_the_same_for_every_seed() -> None:
    data = load_image_classification_data("digits", max_train_samples=200, max_eval_samples=16)
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=10), input_size=SIZE)
    config = TrainingConfig(batch_size=8, norm_check_fraction=0.1)
    assert config.loader_options["norm_check"] == 0.1
    assert TrainingConfig(per_depth_norms=False).loader_options["norm_check"] == 0.0
    loaders = make_loaders(data, model, **config.loader_options, input_size=SIZE)
    check = loaders.norm_check.dataset.data
    assert len(check) == 20 and len(loaders.train.dataset) == len(loaders.recalibration.dataset) == 180
    pixels = {bytes(memoryview(img.tobytes())) for img in check["image"]}
    assert not pixels & {img.tobytes() for img in loaders.train.dataset.data["image"]}
    other_seed = make_loaders(data, model, **{**config.loader_options, "seed": 7}, input_size=SIZE)
    assert other_seed.norm_check.dataset.data["image"][0].tobytes() == check["image"][0].tobytes()


def test_a_depth_keeps_the_statistics_that_classify_the_held_out_images_better(tmp_path: Path) -> None:
    data = load_image_classification_data("digits", max_train_samples=400, max_eval_samples=16)
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=10), input_size=SIZE)
    loaders = make_loaders(data, model, batch_size=32, seed=0, input_size=SIZE, norm_check=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(6):  # a model that classifies the digits well enough for the check to mean something
        for images, labels in loaders.train:
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.recalibrate_norms(loaders.recalibration, [0.25, 0.5, 1.0])
    layers = list(batchnorm_layers(model.model).values())
    with model.scaled(0.5):  # spoil the recalibrated set of s = 0.5: its statistics now lose to training's
        for layer in layers:
            layer.running_mean.add_(5.0)
    kept = keep_better_norms(model, loaders.norm_check, Accelerator(), [0.25, 0.5, 1.0])
    assert kept[0.5] == TRAINING and kept[0.25] in (RECALIBRATED, TRAINING)
    x = next(iter(loaders.eval))[0]
    model.eval()
    with torch.no_grad(), model.scaled(0.5):
        checked = model(x)
        model.depth_norms.use(None)
        training = model(x)
    torch.testing.assert_close(checked, training)  # s = 0.5 runs with (a copy of) the statistics of training
    model.save_pretrained(tmp_path / "m")
    again = AdaptiveDepth.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.set_scaling_factor(0.5)(x), checked)  # the choice is saved
