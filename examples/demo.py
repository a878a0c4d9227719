"""Wrap a model, switch its depth, and print what each depth costs (blocks, FLOPs, measured latency).

    python examples/demo.py                      # resnet50, pretrained weights if cached, else random init
    python examples/demo.py --model convnext_tiny --batch-size 8
    python examples/demo.py --model microsoft/resnet-50 --pretrained   # fail unless the weights are available

Then saves the model, loads it back, and checks that every depth gives the same output.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from adaptive_depth import AdaptiveDepth
from adaptive_depth.model import pretrained_or_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="timm name, Hub id or local folder")
    parser.add_argument("--pretrained", action="store_true", help="make missing pretrained weights an error")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per depth (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = pretrained_or_random(args.model, weights="pretrained" if args.pretrained else "auto").eval()
    print(model.depth_summary())

    x = model.example_input(args.batch_size)
    print(
        f"\nmeasured latency, batch {args.batch_size}, {torch.get_num_threads()} CPU threads, median of "
        f"{args.repeats} runs after warm-up"
    )
    print(f"{'s':>6} {'blocks per stage':<22} {'GFLOPs':>8} {'FLOPs ratio':>11} {'ms':>8} {'latency ratio':>13}")
    flops = model.flops_table()
    measured = model.profile(x, repeats=args.repeats)  # interleaved rounds, median per depth
    rows = sorted(measured.items(), reverse=True)
    full_ms = rows[0][1]
    for s, ms in rows:
        print(
            f"{s:>6g} {model.depth_for(s)!s:<22} {flops[s] / 1e9:>8.3f} {flops[s] / flops[1.0]:>11.3f} "
            f"{ms:>8.2f} {ms / full_ms:>13.3f}"
        )

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AdaptiveDepth.from_pretrained(folder)
        with torch.no_grad():
            same = all(torch.equal(model.set_scaling_factor(s)(x), again.set_scaling_factor(s)(x)) for s in flops)
        print(f"\nsaved to and reloaded from a folder: identical outputs at every depth: {same}")
    plain = model.export(0.5)
    print(
        f"export(0.5): a plain {type(plain).__name__} with "
        f"{sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters "
        f"(full: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
    )


if __name__ == "__main__":
    main()
