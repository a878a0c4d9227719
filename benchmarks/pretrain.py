"""Pretrain a timm model on formula-driven fractals, offline, and save it as a timm repo in the local Hub cache.

No pretrained weights can be downloaded on a machine without the Hub; this makes some. The corpus is FractalDB-style
(benchmarks/fractals.py: each class an iterated function system, each image a random rendering of it; no natural
image anywhere). The model is trained plainly (labels only, full depth: the "plain" configuration of the project's
trainer), evaluated on a stratified held-out share of the corpus, exported as a plain timm module and saved twice:
in ``--output-dir`` with its metrics and log, and in the Hugging Face cache (``HF_HOME``) as the timm Hub repo
``--repo-id``, laid out exactly as a download would leave it. A fresh process with ``HF_HUB_OFFLINE=1`` then loads it
with ``timm.create_model("hf-hub:<repo-id>", pretrained=True)``, which the script checks before it ends.

    python benchmarks/pretrain.py                        # 256 classes, regnetx_002 at 32 px: about one hour on 2 cores
    python benchmarks/pretrain.py --classes 16 --images-per-class 40 --epochs 2     # a quick look

The repo exists only in this machine's cache (it is not on the Hub): load it with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn

from adaptive_depth import AdaptiveDepth, CheckpointError, ConfigError
from adaptive_depth.training import CooperativeTrainer, ImageClassificationData, TrainingConfig, make_loaders
from adaptive_depth.training.checkpoints import checkpoint_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when imported by path in tests
from fractals import Corpus, CorpusSettings, load_or_generate, save_grid

logger = logging.getLogger("pretrain")

REPO_FILES = ("config.json", "model.safetensors", "README.md")
CARD_PHRASE = "pretrained on formula-driven fractals by benchmarks/pretrain.py"
# Fields of the architecture's default pretrained_cfg that describe someone else's weights (ImageNet tags, licence,
# origin): they must not travel into a config that describes these weights.
FOREIGN_CFG_KEYS = {
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag", "license", "origin_url",
    "paper_name", "paper_ids", "notes", "description", "label_names", "label_descriptions", "label_offset",
    "test_input_size", "test_crop_pct", "test_pool_size",
}  # fmt: skip


@dataclass
class PretrainResult:
    """What a run produced: its metrics (also in ``output_dir/metrics.json``) and where the repo lies."""

    metrics: dict[str, Any]
    repo_id: str
    snapshot: Path
    output_dir: Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=256, help="IFS classes (at least 2)")
    p.add_argument("--images-per-class", type=int, default=200)
    p.add_argument("--image-size", type=int, default=32, help="rendered and trained height = width")
    p.add_argument("--model", default="regnetx_002", help="timm architecture name (trained from random weights)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="corpus, split, initialisation, data order and augmentation")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="stratified held-out share of the corpus")
    p.add_argument("--repo-id", default=None, help="default: adaptive-depth-offline/<model>.fractal<classes>_<size>px")
    p.add_argument("--output-dir", type=Path, default=None, help="default: out/pretrain/<repo name>")
    p.add_argument("--corpus-dir", type=Path, default=Path("out/pretrain/corpus"), help="rendered corpus cache")
    p.add_argument("--overwrite-output-dir", action="store_true", help="reuse an output folder that holds files")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --output-dir")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    args = p.parse_args(argv)
    try:
        args.corpus = CorpusSettings(args.classes, args.images_per_class, args.image_size, args.seed)
        TrainingConfig(**_training_fields(args))
    except ConfigError as e:
        p.error(str(e))
    if not timm.is_model(args.model):
        p.error(f"--model {args.model!r} is not a timm architecture name (see timm.list_models())")
    total = args.classes * args.images_per_class
    held_out = math.ceil(args.eval_fraction * total) if 0 < args.eval_fraction < 1 else 0
    if not (args.classes <= held_out <= total - args.classes):
        p.error(
            f"--eval-fraction {args.eval_fraction} of {args.classes} x {args.images_per_class} images holds out "
            f"{held_out}: a stratified split needs a fraction in (0, 1) that leaves at least one image per class on "
            "each side; raise --images-per-class or change --eval-fraction"
        )
    name = f"{args.model}.fractal{args.classes}_{args.image_size}px"
    args.repo_id = args.repo_id or f"adaptive-depth-offline/{name}"
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        p.error(f"--repo-id: {e}")
    if args.repo_id.count("/") != 1:
        p.error(f"--repo-id must be 'org/name' (timm loads 'hf-hub:org/name'), got {args.repo_id!r}")
    args.output_dir = args.output_dir or Path("out/pretrain") / args.repo_id.split("/")[1]
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not (args.overwrite_output_dir or args.resume):
        p.error(f"--output-dir {args.output_dir} holds files: pass --overwrite-output-dir, or --resume")
    return args


def _training_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The plain baseline of benchmarks/accuracy.py: one network, full depth, labels only."""
    return {
        "scaling_factors": [1.0], "leader": "none", "interactive": False, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs, "label_smoothing": args.label_smoothing, "seed": args.seed,
    }  # fmt: skip


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, every setting spelled out (so later changes of the defaults do not matter)."""
    flags = [
        "--classes", args.classes, "--images-per-class", args.images_per_class, "--image-size", args.image_size,
        "--model", args.model, "--epochs", args.epochs, "--batch-size", args.batch_size, "--learning-rate",
        args.learning_rate, "--weight-decay", args.weight_decay, "--warmup-epochs", args.warmup_epochs,
        "--label-smoothing", args.label_smoothing, "--seed", args.seed, "--eval-fraction", args.eval_fraction,
        "--repo-id", args.repo_id,
    ]  # fmt: skip
    return shlex.join(["python", "benchmarks/pretrain.py", *map(str, flags)])


def to_data(corpus: Corpus, eval_fraction: float, seed: int) -> ImageClassificationData:
    """The corpus as a ``datasets`` image-classification dataset, a stratified share held out."""
    names = [f"ifs_{c:03d}" for c in range(corpus.settings.num_classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    full = datasets.Dataset.from_dict({"image": list(corpus.images), "label": corpus.labels.tolist()}, features)
    parts = full.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column="label")
    return ImageClassificationData(parts["train"], parts["test"], len(names), names, "image", "label", "fractals")


def export_plain(model: AdaptiveDepth, tag: str, image_size: int) -> nn.Module:
    """The full-depth network as a plain timm module whose ``pretrained_cfg`` describes these weights only."""
    plain = model.export(1.0).eval()
    cfg = {k: v for k, v in plain.pretrained_cfg.items() if k not in FOREIGN_CFG_KEYS}
    cfg.update(
        tag=tag,
        input_size=(3, image_size, image_size),
        pool_size=None,  # the architecture's default is for its default input size
        description=f"{CARD_PHRASE} (adaptive-depth): no natural images",
    )
    plain.pretrained_cfg = cfg
    return plain


def model_card(args: argparse.Namespace, metrics: dict[str, Any]) -> ModelCard:
    """README.md with YAML metadata that says what the weights are, how good, how made and how to use them."""
    ev, tr, split, c = metrics["eval"], metrics["training"], metrics["split"], args.corpus
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["timm", "image-classification", "adaptive-depth", "fractal-pretraining", "synthetic-data"],
        pretraining_data="formula-driven fractals (no natural images)",
        fractal_corpus={
            "classes": c.num_classes,
            "images_per_class": c.images_per_class,
            "image_size": c.image_size,
            "seed": c.seed,
        },
        held_out_top1=round(ev["top1"], 2),
    )
    hours = tr["seconds"] / 3600
    resumed = f" for the last {tr['steps_this_process']} steps, resumed from a checkpoint" if tr["resumed"] else ""
    top5 = f"top-5 {ev['top5']:.2f}%, " if ev["top5"] is not None else ""
    body = f"""
# {args.repo_id}

`{args.model}` **{CARD_PHRASE}** of the adaptive-depth project (formula-driven supervised pretraining: no
natural image was used). These are not ImageNet weights; they are a starting point made offline, where no
pretrained weights could be downloaded. The repo exists only in the local Hugging Face cache of the machine that ran
the script.

## Data

A FractalDB-style corpus (Kataoka et al., *Pre-training without Natural Images*, ACCV 2020), rendered by
`benchmarks/fractals.py`: each class is an iterated function system of 2-4 random affine maps sampled by their
singular values under the sigma-factor constraint (Anderson & Farrell, *Improving Fractal Pre-training*, WACV 2022),
each image a chaos-game rendering with jittered maps, random pose, a colour per map and a random background.

| classes | images per class | image size | seed | training images | held-out images |
|---|---|---|---|---|---|
| {c.num_classes} | {c.images_per_class} | {c.image_size} px | {c.seed} | {split["train"]} | {split["eval"]} |

## Result

Held-out top-1 on the {c.num_classes} fractal classes: **{ev["top1"]:.2f}%** ({top5}chance
{100 / c.num_classes:.2f}%), after {tr["steps"]} steps ({tr["epochs"]} epochs, batch {tr["batch_size"]}, AdamW lr
{tr["learning_rate"]:g}, cosine) trained plainly at full depth with labels only. Training time: {tr["seconds"]:.0f} s
({hours:.2f} h{resumed}, {tr["seconds_per_step"]:.3f} s per step, {tr["threads"]} torch threads on {tr["device"]}).

## Reproduce

```bash
{metrics["command"]}
```

## Use

```python
# HF_HUB_OFFLINE=1: the repo is in the local cache only
import timm
from adaptive_depth import AdaptiveDepth

model = timm.create_model("hf-hub:{args.repo_id}", pretrained=True)
adaptive = AdaptiveDepth.from_pretrained("hf-hub:{args.repo_id}", num_classes=10)  # new head, pretrained body
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(repo_id: str, folder: Path, filenames: tuple[str, ...] = REPO_FILES) -> Path:
    """Lay ``folder``'s files out as a downloaded Hub repo in ``HF_HUB_CACHE``; returns the snapshot folder.

    As ``hf_hub_download`` leaves them: ``blobs/<etag>`` (sha256 for LFS files, the git blob id for others),
    ``snapshots/<commit>/<file>`` relative links to the blobs (copies where links are not allowed) and
    ``refs/main``. The commit id is derived from the files' contents: no such commit exists on the Hub.
    """
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    etags = {}
    for name in filenames:
        data = (folder / name).read_bytes()
        etags[name] = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_id(data)
        blob = repo_dir / "blobs" / etags[name]
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            partial = blob.with_name(f"{blob.name}.{os.getpid()}.incomplete")
            partial.write_bytes(data)
            partial.replace(blob)
    commit = hashlib.sha1("".join(f"{n} {e}\n" for n, e in sorted(etags.items())).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, etag in etags.items():
        link, blob = snapshot / name, repo_dir / "blobs" / etag
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, snapshot))
        except OSError:  # e.g. Windows without developer mode: huggingface_hub copies too
            shutil.copyfile(blob, link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


_LOAD_IN_FRESH_PROCESS = """
import sys, timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("hf-hub:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    save_file({"logits": model(load_file(sys.argv[2])["x"]).contiguous()}, sys.argv[3])
"""


def verify_offline(repo_id: str, plain: nn.Module, images: torch.Tensor) -> float:
    """Load the cached repo with timm in a fresh ``HF_HUB_OFFLINE=1`` process; the largest logit difference.

    Raises:
        CheckpointError: the repo does not load, or gives other logits than ``plain``.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        x, out = Path(tmp) / "x.safetensors", Path(tmp) / "logits.safetensors"
        save_file({"x": images.contiguous()}, str(x))
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(constants.HF_HUB_CACHE)}
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, repo_id, str(x), str(out)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise CheckpointError(f"timm could not load hf-hub:{repo_id} offline:\n{done.stderr[-3000:]}")
        loaded, expected = load_file(str(out))["logits"], plain.eval()(images)
    diff = float((loaded - expected).abs().max())
    if loaded.shape != expected.shape or not torch.allclose(loaded, expected, rtol=1e-4, atol=1e-4):
        raise CheckpointError(f"hf-hub:{repo_id} loads, but its logits differ from the trained model's by {diff:.3g}")
    return diff


def train(args: argparse.Namespace, data: ImageClassificationData) -> tuple[Any, Any, float, int]:
    """Train the plain network with the project's trainer.

    Returns the trainer, its result, and the seconds and steps of this process (after a resume: since it).
    """
    config = TrainingConfig(**_training_fields(args))
    set_seed(args.seed)
    base = timm.create_model(args.model, pretrained=False, num_classes=data.num_classes)
    model = AdaptiveDepth.wrap(base, input_size=[3, args.image_size, args.image_size], scaling_factors=[1.0])
    # input_size: without it the transforms would resize to the architecture's default size (224 px for regnetx_002)
    loaders = make_loaders(
        data,
        model,
        batch_size=args.batch_size,
        seed=args.seed,
        input_size=model.config.input_size,
        num_workers=args.num_workers,
    )
    trainer = CooperativeTrainer(
        model, config, loaders.train, loaders.eval, accelerator=Accelerator(), num_classes=data.num_classes,
        recalibration_loader=loaders.recalibration, output_dir=args.output_dir,
    )  # fmt: skip
    resume = "latest" if args.resume and trainer.checkpoint_dirs() else None
    first_step = (checkpoint_step(trainer.checkpoint_dirs()[-1]) or 0) if resume else 0
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    result = trainer.evaluate(latency=False)
    trainer.remove_checkpoints()
    return trainer, result, seconds, trainer.progress.step - first_step


def main(argv: list[str] | None = None) -> PretrainResult:
    """Render (or load) the corpus, pretrain, evaluate, save the repo in the Hub cache and check it loads offline."""
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet = logging.getLogger("accelerate")  # one line per file of every epoch checkpoint
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    log_file = logging.FileHandler(args.output_dir / "pretrain.log", mode="a" if args.resume else "w")
    logging.getLogger().addHandler(log_file)
    try:
        return _run(args)
    finally:  # called in-process (tests, notebooks): leave logging as it was found
        logging.getLogger().removeHandler(log_file)
        log_file.close()
        quiet.setLevel(level)


def _run(args: argparse.Namespace) -> PretrainResult:
    start = time.perf_counter()
    corpus, cache, rendered = load_or_generate(args.corpus, args.corpus_dir)
    render_seconds = time.perf_counter() - start
    how = f"rendered in {render_seconds:.1f} s ({len(corpus.images) / render_seconds:.0f} images/s)"
    logger.info("corpus %s: %d images, %s", cache, len(corpus.images), how if rendered else "cached")
    save_grid(corpus, args.output_dir / "fractal_samples.png")
    data = to_data(corpus, args.eval_fraction, args.seed)
    logger.info("training %s on %d images, %d held out, %d threads", args.model, len(data.train), len(data.eval),
                torch.get_num_threads())  # fmt: skip
    trainer, result, seconds, steps_here = train(args, data)
    full = next(r for r in result.results if r.player == result.deployed and r.scaling_factor == 1.0)
    steps = trainer.progress.step
    plain = export_plain(result.model, f"fractal{args.classes}_{args.image_size}px", args.image_size)
    metrics: dict[str, Any] = {
        "repo_id": args.repo_id,
        "model": args.model,
        "corpus": asdict(args.corpus) | {"cache": str(cache), "rendered_now": rendered, "seconds": render_seconds},
        "split": {"train": len(data.train), "eval": len(data.eval), "eval_fraction": args.eval_fraction},
        "training": trainer.config.to_dict()
        | {
            "steps": steps, "seconds": seconds, "seconds_per_step": seconds / max(1, steps_here),
            "steps_this_process": steps_here, "resumed": args.resume,
            "loss_per_epoch": result.history, "threads": torch.get_num_threads(),
            "device": f"{trainer.accelerator.device} ({platform.processor() or platform.machine()})",
        },
        "eval": {"top1": full.top1, "top5": full.top5, "top1_training_norms": full.top1_trained_norms,
                 "chance": 100 / data.num_classes},
        "command": command_line(args),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__},
    }  # fmt: skip
    logger.info("held-out top-1 %.2f%% (top-5 %s, chance %.2f%%) after %d steps in %.0f s (%.3f s/step)",
                full.top1, full.top5, 100 / data.num_classes, steps, seconds, seconds / max(1, steps_here))  # fmt: skip
    data_config = {"input_size": plain.pretrained_cfg["input_size"]}
    save_for_hf(plain, str(args.output_dir), safe_serialization=True, data_config=data_config)
    model_card(args, metrics).save(args.output_dir / "README.md")
    snapshot = write_hub_cache(args.repo_id, args.output_dir)
    size = [3, args.image_size, args.image_size]
    images = next(iter(make_loaders(data, plain, batch_size=16, seed=args.seed, input_size=size).eval))[0]
    with torch.no_grad():  # the export is the trained network: same logits as the wrapper at full depth
        export_diff = float((plain(images) - result.model.eval().set_scaling_factor(1.0)(images)).abs().max())
    metrics["verification"] = {"offline_load_max_abs_diff": verify_offline(args.repo_id, plain, images),
                               "export_max_abs_diff": export_diff}  # fmt: skip
    metrics["snapshot"] = str(snapshot)
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    repo = f"hf-hub:{args.repo_id}"
    print(
        f"\nheld-out top-1 on {data.num_classes} fractal classes: {full.top1:.2f}% ({steps} steps, {seconds / 60:.1f} "
        f"min)\nsaved {snapshot} (and {args.output_dir}); checked: timm loads it offline, same logits.\n"
        f"Use it (offline, from this machine's cache: export HF_HUB_OFFLINE=1):\n"
        f'  AdaptiveDepth.from_pretrained("{repo}", num_classes=10)\n'
        f"  accelerate launch examples/finetune.py --model {repo} --pretrained\n"
        f"  python benchmarks/accuracy.py --model {repo} --weights pretrained"
    )
    return PretrainResult(metrics, args.repo_id, snapshot, args.output_dir)


if __name__ == "__main__":
    main()
