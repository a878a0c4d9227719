"""Formula-driven pretraining (benchmarks/fractals.py, benchmarks/pretrain.py), end to end on a tiny corpus, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from adaptive_depth import AdaptiveDepth, ConfigError
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    return load_script(f"benchmarks/{name}.py")


def test_fractal_corpus_is_deterministic_per_seed_and_classes_differ(tmp_path: Path) -> None:
    fractals = _script("fractals")
    settings = fractals.CorpusSettings(num_classes=3, images_per_class=4, image_size=16, seed=0)
    first, again = fractals.generate(settings), fractals.generate(settings)
    assert first.images.shape == (12, 16, 16, 3) and first.images.dtype == np.uint8
    assert first.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(first.images, again.images) and np.array_equal(first.systems, again.systems, equal_nan=True)
    other = fractals.generate(fractals.CorpusSettings(3, 4, 16, seed=1))
    assert not np.array_equal(first.images, other.images)
    # A class is the same whatever the number of classes: corpora of different sizes share their first classes.
    fewer = fractals.generate(fractals.CorpusSettings(2, 4, 16, seed=0))
    assert np.array_equal(fewer.images, first.images[:8])
    # Each class has its own IFS; instances of a class are renderings of it, alike but never identical.
    maps = [s[~np.isnan(s[:, 0])] for s in first.systems]
    assert all(2 <= len(m) <= 4 for m in maps)
    assert all(np.all(m[:, 2] >= m[:, 3]) and np.all(m[:, 2] <= 1) and np.all(m[:, 3] >= 0) for m in maps)
    assert len({m.tobytes() for m in maps}) == 3
    for c in range(3):
        block = first.images[c * 4 : (c + 1) * 4].reshape(4, -1)
        assert len({row.tobytes() for row in block}) == 4
    assert first.images.reshape(12, -1).std(axis=1).min() > 5  # a shape on a background, not a flat image
    # The cache: rendered once, then read back bitwise.
    corpus, path, rendered = fractals.load_or_generate(settings, tmp_path)
    cached, same_path, rendered_again = fractals.load_or_generate(settings, tmp_path)
    assert rendered and not rendered_again and path == same_path and path.is_file()
    assert np.array_equal(corpus.images, cached.images) and np.array_equal(cached.images, first.images)
    assert fractals.save_grid(cached, tmp_path / "grid.png", classes=3, instances=4).stat().st_size > 0


def test_singular_values_meet_the_sigma_factor() -> None:
    fractals = _script("fractals")
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):
        for _ in range(50):
            alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
            s = fractals.sample_singular_values(rng, n, alpha)
            assert s.shape == (n, 2) and np.isclose((s[:, 0] + 2 * s[:, 1]).sum(), alpha)
            assert np.all(s[:, 0] <= 1 + 1e-12) and np.all(s[:, 1] >= 0) and np.all(s[:, 0] >= s[:, 1] - 1e-12)


def test_bad_settings_are_clear_errors() -> None:
    fractals = _script("fractals")
    pretrain = _script("pretrain")
    with pytest.raises(ConfigError, match="num_classes"):
        fractals.CorpusSettings(num_classes=1)
    with pytest.raises(ConfigError, match="images_per_class"):
        fractals.CorpusSettings(images_per_class=0)
    for argv in (
        ["--classes", "1"],
        ["--images-per-class", "0"],
        ["--classes", "4", "--images-per-class", "2", "--eval-fraction", "0.1"],  # 1 held out for 4 classes
        ["--eval-fraction", "1.5"],
        ["--model", "not_a_model"],
        ["--repo-id", "no-org"],
        ["--epochs", "0"],
    ):
        with pytest.raises(SystemExit):
            pretrain.parse_args(argv)


def test_pretrain_writes_a_timm_hub_repo_that_adaptive_depth_loads_offline(tmp_path: Path) -> None:
    pretrain = _script("pretrain")
    repo_id = "adaptive-depth-test/regnetx_002.fractal4_32px"
    result = pretrain.main(
        ["--classes", "4", "--images-per-class", "8", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
         "--eval-fraction", "0.25", "--repo-id", repo_id, "--output-dir", str(tmp_path / "out"),
         "--corpus-dir", str(tmp_path / "corpus")]
    )  # fmt: skip
    repo_dir = result.snapshot.parents[1]
    try:
        # The layout of a download: refs/main names the snapshot, whose files link to blobs.
        assert repo_dir.name == "models--adaptive-depth-test--regnetx_002.fractal4_32px"
        assert (repo_dir / "refs" / "main").read_text() == result.snapshot.name and len(result.snapshot.name) == 40
        assert sorted(p.name for p in result.snapshot.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        config = json.loads((result.snapshot / "config.json").read_text())
        assert config["architecture"] == "regnetx_002" and config["num_classes"] == 4
        cfg = config["pretrained_cfg"]
        assert cfg["input_size"] == [3, 32, 32] and "mean" in cfg and "crop_pct" in cfg
        assert cfg["tag"] == "fractal4_32px" and "license" not in cfg and "origin_url" not in cfg  # not ImageNet's
        card = (result.snapshot / "README.md").read_text()
        assert pretrain.CARD_PHRASE in card and "no natural image" in card
        assert "library_name: timm" in card and result.metrics["command"] in card
        metrics = json.loads((result.output_dir / "metrics.json").read_text())
        assert metrics["corpus"]["num_classes"] == 4 and metrics["split"] == {"train": 24, "eval": 8,
                                                                               "eval_fraction": 0.25}  # fmt: skip
        assert 0 <= metrics["eval"]["top1"] <= 100 and metrics["training"]["steps"] == 3
        assert metrics["verification"]["offline_load_max_abs_diff"] <= 1e-4
        assert (result.output_dir / "fractal_samples.png").is_file() and (result.output_dir / "pretrain.log").is_file()
        assert not (result.output_dir / "checkpoints").exists()

        plain = timm.create_model("regnetx_002", num_classes=4).eval()
        plain.load_state_dict(load_file(str(result.output_dir / "model.safetensors")))
        x = torch.randn(2, 3, 32, 32)
        model = AdaptiveDepth.from_pretrained(f"hf-hub:{repo_id}").eval()  # HF_HUB_OFFLINE=1 (conftest)
        assert model.config.input_size == [3, 32, 32] and model.config.base_model.pretrained
        with torch.no_grad():
            assert torch.allclose(model(x), plain(x), rtol=0, atol=1e-6)

        new_head = AdaptiveDepth.from_pretrained(f"hf-hub:{repo_id}", num_classes=10)
        assert new_head.model.head.fc.out_features == 10
        state = new_head.model.state_dict()
        body = {k: v for k, v in plain.state_dict().items() if not k.startswith("head.fc.")}
        assert body and all(torch.equal(state[k], v) for k, v in body.items())
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
