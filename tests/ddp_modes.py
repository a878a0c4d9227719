"""Every training mode for two optimizer steps under DDP; launched by tests/test_training_reliability.py as

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/ddp_modes.py [--batch-size 8] [MODE...]

It prints ``OK <mode> steps=<n> checksum=<sum of the weights>`` per mode on the main process; a mode that DDP
cannot run raises. The same global batch on one process (``--batch-size 16``) must give the same checksums.
"""

from __future__ import annotations

import argparse

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.training import (
    CooperativeTrainer,
    TrainingConfig,
    accelerator_kwargs,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.recipes import COOPERATIVE

SINGLE = {"train_depths": "all", "leader": "none", "interactive": False}
MODES = {
    "two-teammates": {**COOPERATIVE, "interactive": True},
    "one-teammate": COOPERATIVE,
    "random-depth": {"scaling_factors": [1.0], "layer_drop": 0.5, "train_depths": "top", "leader": "none"},
    "sandwich": {**COOPERATIVE, "sampled_depths": 1, "scaling_factors": [0.25, 0.5, 0.75, 1.0]},
    "frozen-leader": {**COOPERATIVE, "leader": "frozen"},
    "cached-leader": {"leader": "cached", "train_depths": "sampled", "interactive": False},
    "sampled-ema": {"leader": "ema", "train_depths": "sampled", "interactive": False},
    "nested": {},  # the default
    "alone": {"scaling_factors": [0.5], "full_depth": False, **SINGLE},
    "views": {**COOPERATIVE, "interactive": True, "teammate_data": "views"},
    "streams": {**COOPERATIVE, "interactive": True, "teammate_data": "streams"},
}


def _model() -> AdaptiveDepth:
    return AdaptiveDepth.wrap(timm.create_model("test_convnext", num_classes=10), input_size=[3, 32, 32])


def main(modes: list[str], batch_size: int) -> None:
    # 36 images: 32 to train on, 4 held out to check the per-depth BatchNorm statistics
    data = load_image_classification_data("digits", max_train_samples=36, max_eval_samples=16)
    for mode in modes:
        config = TrainingConfig(**{"epochs": 1, "batch_size": batch_size, "scaling_factors": [0.5, 1.0]} | MODES[mode])
        set_seed(0)
        model = _model()
        leader = _model().export(1.0).eval() if config.leader in ("frozen", "cached") else None
        loaders = make_loaders(data, model, **config.loader_options, input_size=[3, 32, 32])
        trainer = CooperativeTrainer(
            model,
            config,
            loaders.train,
            loaders.eval,
            leader=leader,
            accelerator=Accelerator(**accelerator_kwargs(config)),
            recalibration_loader=loaders.recalibration,
            norm_check_loader=loaders.norm_check,
        )
        trainer.train()
        checksum = sum(p.detach().double().sum().item() for p in trainer.module.parameters())
        if trainer.accelerator.is_main_process:
            print(f"OK {mode} steps={trainer.progress.step} checksum={checksum:.9e}", flush=True)
    # An Accelerator built without telling DDP of unused blocks is refused before training, with the fix.
    config = TrainingConfig(epochs=1, batch_size=batch_size, **MODES["random-depth"])
    model = _model()
    loaders = make_loaders(data, model, batch_size=batch_size, seed=0, input_size=[3, 32, 32])
    accelerator = Accelerator()
    try:
        CooperativeTrainer(model, config, loaders.train, accelerator=accelerator)
    except ConfigError as e:
        if accelerator.is_main_process and "accelerator_kwargs" in str(e):
            print("OK refused", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("modes", nargs="*", help=f"some of {list(MODES)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    main(args.modes or list(MODES), args.batch_size)
