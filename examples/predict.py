"""Classify image files with a depth-switchable model, at the depth you choose.

    python examples/predict.py out/finetune digit.png                      # the model saved by finetune.py
    python examples/predict.py me/resnet50-adaptive cat.jpg dog.jpg --scaling-factor 0.5 --top-k 3
    python examples/predict.py out/finetune digit.png --max-latency-ms 2    # the largest depth within a budget
    python examples/predict.py out/finetune digit.png --max-latency-ms 2 --device cuda --profile   # measured there

The model's own preprocessing (``model.create_transform()``: the timm data config or the transformers image
processor saved with it) and class names (``model.id2label``) come with it; nothing is configured here. A latency
budget uses the latency profile saved with the model, measured on the device it was fine-tuned on; on another
device (or thread count) it is refused: ``--profile`` measures this one (and saves it into a local model folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from adaptive_depth import AdaptiveDepth, AdaptiveDepthError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a model, image files, and the depth (a scaling factor or a budget)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved adaptive-depth model: local folder or Hub id")
    p.add_argument("images", nargs="+", type=Path, help="image files (any format PIL reads)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--scaling-factor", type=float, default=1.0, help="the depth, in (0, 1] (default: 1, full)")
    depth.add_argument("--max-latency-ms", type=float, help="the largest trained depth within this measured latency")
    depth.add_argument("--max-gflops", type=float, help="the largest trained depth within this many GFLOPs")
    p.add_argument("--top-k", type=int, default=1, help="classes printed per image")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure every trained depth's latency on --device first (saved into MODEL if it is a local folder)",
    )
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a torch device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: torch sees no CUDA device here")
    return args


def load_image(path: Path) -> Image.Image:
    """An RGB image, or a clear error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, IsADirectoryError) as e:
        raise SystemExit(f"error: {path}: no such image file") from e
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"error: {path} is not an image PIL can read ({e})") from e


def predict(model: AdaptiveDepth, images: list[Image.Image], top_k: int = 1) -> list[list[tuple[str, float]]]:
    """The ``top_k`` (class name, probability) pairs of every image, at the model's current depth."""
    transform = model.create_transform()
    batch = torch.stack([transform(image) for image in images])
    param = next(model.parameters())
    with torch.inference_mode():
        out = model(batch.to(device=param.device, dtype=param.dtype))
    logits = out.logits if hasattr(out, "logits") else out  # transformers models return an output object
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    names = model.id2label
    return [
        [(names.get(int(i), str(int(i))), float(v)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values, indices)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = [load_image(path) for path in args.images]
    model = AdaptiveDepth.from_pretrained(args.model).eval().to(args.device)
    if args.profile:
        measured = model.profile(batch_size=1)
        print(
            f"latency on {model.latency_profile.device}: "
            + ", ".join(f"s={s:g} {ms:.3g} ms" for s, ms in measured.items())
        )
        if Path(args.model).is_dir():  # at its saved default depth still: the saved model changes by its profile only
            model.save_pretrained(args.model)
            print(f"saved the profile into {args.model}")
    if args.max_latency_ms is not None or args.max_gflops is not None:
        flops = args.max_gflops * 1e9 if args.max_gflops is not None else None
        model.set_budget(max_flops=flops, max_latency_ms=args.max_latency_ms)  # switches to the depth it picks
    else:
        model.set_scaling_factor(args.scaling_factor)
    print(f"s = {model.scaling_factor:g}, blocks per stage {model.active_depth}, {model.flops() / 1e9:.4f} GFLOPs")
    for path, top in zip(args.images, predict(model, images, args.top_k)):
        print(f"{path}: " + ", ".join(f"{name} ({p:.1%})" for name, p in top))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdaptiveDepthError as e:  # bad input: one clear line, no traceback
        sys.exit(f"error: {e}")
