"""ONNX and torch.export exports: any architecture at one depth, or every trained depth in one file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from PIL import Image

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.norms import batchnorm_layers
from adaptive_depth.outputs import logits_of


def _logits(model: AdaptiveDepth, x: torch.Tensor, s: float) -> torch.Tensor:
    with torch.no_grad(), model.scaled(s):
        return logits_of(model(x))


def _resnet_with_depth_norms() -> AdaptiveDepth:
    """resnet18 with one stage of two blocks (two gated blocks), and BatchNorm statistics of its own per depth."""
    model = AdaptiveDepth.from_pretrained(
        "resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32), layers=[2, 1, 1, 1]
    )
    for layer in batchnorm_layers(model.model).values():  # timm zero-initialises each block's last BatchNorm
        torch.nn.init.uniform_(layer.weight, 0.5, 1.5)
    model.recalibrate_norms([torch.randn(8, 3, 32, 32) for _ in range(2)])
    return model.eval()


def _timm_vit() -> AdaptiveDepth:
    return AdaptiveDepth.from_pretrained("test_vit", pretrained=False, num_classes=3, depth=2).eval()


def _transformers_vit() -> AdaptiveDepth:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"},
    )  # fmt: skip
    return AdaptiveDepth.wrap(transformers.ViTForImageClassification(config)).eval()


def _mvitv2() -> AdaptiveDepth:
    """MViTv2: its blocks take and return the feature map's size beside the tokens; a skipped one hands both on."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 2, 1), embed_dim=16, num_heads=1), img_size=(64, 64))
    return AdaptiveDepth.wrap(model, input_size=(3, 64, 64)).eval()


@pytest.mark.parametrize("make", [_resnet_with_depth_norms, _timm_vit, _transformers_vit, _mvitv2])
def test_every_trained_depth_in_one_onnx_file(tmp_path: Path, make: Callable[[], AdaptiveDepth]) -> None:
    model = make()
    folder = model.save_export(tmp_path / "all", "all")
    weights = sum(t.numel() * t.element_size() for t in model.model.state_dict().values())
    assert (folder / "model.onnx").stat().st_size < 1.5 * weights  # the weights once (once per depth: 2-4x)
    described = json.loads((folder / "config.json").read_text())["adaptive_depth"]
    assert described["inputs"] == ["pixel_values", "depth_index"]
    assert [d["scaling_factor"] for d in described["depths"]] == model.config.scaling_factors
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *model.config.input_size)
    outputs = []
    for i, depth in enumerate(described["depths"]):
        assert depth["blocks_per_stage"] == model.depth_for(depth["scaling_factor"])
        got = torch.from_numpy(session.run(None, {"pixel_values": x.numpy(), "depth_index": np.array(i)})[0])
        torch.testing.assert_close(got, _logits(model, x, depth["scaling_factor"]), atol=2e-5, rtol=1e-4)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[-1], atol=1e-3)  # the depths really differ
    if model.depth_norms is not None:  # and each runs with its own BatchNorm statistics, not those of training
        with torch.no_grad(), model.scaled(0.25):
            model.depth_norms.use(None)
            assert not torch.allclose(outputs[0], logits_of(model(x)), atol=1e-3)
    if model.config.base_model.source == "transformers":  # Optimum's layout, the config transformers reads
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md", "config.json", "model.onnx", "preprocessor_config.json"
        ]  # fmt: skip
        assert transformers.AutoConfig.from_pretrained(folder).id2label == {0: "cat", 1: "dog", 2: "fish"}


def test_an_architecture_without_a_depth_argument_exports_to_onnx_and_its_card_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = AdaptiveDepth.from_pretrained("regnetx_002", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    model.set_labels(["cat", "dog", "fish"]).eval()
    folder = model.save_export(tmp_path / "half", 0.5, format="onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.onnx"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "regnetx_002" and config["id2label"] == {"0": "cat", "1": "dog", "2": "fish"}
    assert config["adaptive_depth"]["depths"] == [{"scaling_factor": 0.5, "blocks_per_stage": model.depth_for(0.5)}]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
        torch.testing.assert_close(got, _logits(model, x, 0.5), atol=2e-5, rtol=1e-4)
    # The card's snippet runs as written (onnxruntime, transformers' image processor; not this library) and names
    # the class the model picks.
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    monkeypatch.chdir(tmp_path)
    image.save("image.jpg")
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(folder))
    assert "adaptive_depth" not in snippet
    exec(compile(snippet, "onnx card", "exec"), {})  # our own card's code
    with torch.no_grad(), model.scaled(0.5):
        expected = model.id2label[int(model(model.create_transform()(image).unsqueeze(0)).argmax())]
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected


@pytest.mark.filterwarnings("ignore:No complete tensor found")  # torch.export.load of weights on the CPU
def test_torch_export_programs_of_one_depth_and_of_every_depth(tmp_path: Path) -> None:
    model = _resnet_with_depth_norms()
    x = torch.randn(3, 3, 32, 32)
    one = model.save_export(tmp_path / "half", 0.5, format="torch.export")
    assert sorted(p.name for p in one.iterdir()) == ["README.md", "config.json", "model.pt2"]
    torch.testing.assert_close(torch.export.load(one / "model.pt2").module()(x), _logits(model, x, 0.5))
    every = model.save_export(tmp_path / "all", "all", format="torch.export")
    program = torch.export.load(every / "model.pt2").module()
    for i, s in enumerate(model.config.scaling_factors):
        torch.testing.assert_close(program(x, torch.tensor(i)), _logits(model, x, s))


def test_exports_in_another_format_replace_the_files_of_the_first(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    folder = model.save_export(tmp_path / "out", 0.5)
    assert (folder / "model.safetensors").is_file()
    model.save_export(folder, 0.5, format="torch.export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.pt2"]


@pytest.mark.parametrize(
    ("scaling_factor", "kwargs", "message"),
    [
        (0.5, {"format": "tflite"}, r"format must be one of .* got 'tflite'"),
        ("half", {}, r"a number in \(0, 1\] or 'all'.* got 'half'"),
        ("all", {"format": "repo"}, r"repository holds one depth.*format='onnx'"),
        ("all", {"depth": [1, 1, 1, 1]}, r"leave depth= out"),
    ],
)
def test_export_requests_that_cannot_work_are_refused_before_anything_is_written(
    tmp_path: Path, scaling_factor: object, kwargs: dict[str, object], message: str
) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match=message):
        model.save_export(tmp_path / "out", scaling_factor, **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_file_that_onnxruntime_disagrees_with_is_not_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_depth import export_repo

    model = AdaptiveDepth.from_pretrained("test_vit", pretrained=False, num_classes=3, depth=2).eval()
    monkeypatch.setattr(export_repo, "run_onnx", lambda session, feeds: torch.zeros(3, 3))  # a wrong result
    wrong = r"the ONNX file at s = 1.0, blocks per stage \[2\] in onnxruntime computes another function"
    with pytest.raises(ConfigError, match=wrong):
        model.save_export(tmp_path / "out", 1.0, format="onnx")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # nothing kept, the staging folder removed


def test_the_check_allows_rounding_at_the_scale_of_the_outputs_and_nothing_more() -> None:
    """Random-weight MobileOne's logits reach 2e5: onnxruntime's rounding of those leaves its small logits 0.1 off,
    which is no other function; a difference at 1e-3 of the largest output, or a NaN, is."""
    from adaptive_depth.export_files import check_outputs

    expected = torch.tensor([[241045.5, -180000.0, 12.0, 0.5]])
    rounded = expected + torch.tensor([[0.125, -0.0625, 0.1, -0.1]])
    assert check_outputs(rounded, expected, "the file") == pytest.approx(0.125)
    with pytest.raises(ConfigError, match="computes another function"):
        check_outputs(expected + torch.tensor([[0.0, 0.0, 241.0, 0.0]]), expected, "the file")
    with pytest.raises(ConfigError, match="computes another function"):
        check_outputs(torch.full_like(expected, float("nan")), expected, "the file")
    small = torch.tensor([[0.5, -0.25]])  # outputs of ordinary size: the absolute tolerance rules
    with pytest.raises(ConfigError, match="computes another function"):
        check_outputs(small + 1e-3, small, "the file")


def test_onnx_falls_back_to_the_torchscript_exporter_where_the_torch_export_route_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's ViT-relpos reshapes a transposed tensor: converted in grad mode, its program failed in the ONNX
    converter (a view a symbolic batch cannot take); it converts without gradients. Where the torch.export route
    fails all the same (CoaT cannot be traced), the TorchScript exporter writes the file, checked like the other."""
    from adaptive_depth import export_repo

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported: ONNX export of this operator")

    model = AdaptiveDepth.from_pretrained("test_vit_relpos", pretrained=False, num_classes=3).eval()
    with monkeypatch.context() as patch:
        patch.setattr(export_repo, "write_onnx_traced", fails)  # the torch.export route alone
        model.save_export(tmp_path / "relpos", 0.5, format="onnx")
    x = torch.randn(5, *model.config.input_size)  # a batch of another size than the one traced
    session = ort.InferenceSession(str(tmp_path / "relpos" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixel_values": x.numpy()})[0], _logits(model, x, 0.5), atol=1e-4)

    untraceable = ConfigError("torch.export cannot trace this model (SpecViolationError: ...)")
    monkeypatch.setattr(export_repo, "export_program", lambda *a, **k: (_ for _ in ()).throw(untraceable))
    model.save_export(tmp_path / "traced", 0.5, format="onnx")  # the TorchScript exporter, then the same check
    session = ort.InferenceSession(str(tmp_path / "traced" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixel_values": x.numpy()})[0], _logits(model, x, 0.5), atol=1e-4)

    monkeypatch.setattr(export_repo, "write_onnx_traced", fails)
    both = r"no ONNX exporter.*torch.export route: ConfigError: torch.export cannot.*TorchScript exporter: Runtime"
    with pytest.raises(ConfigError, match=both):
        model.save_export(tmp_path / "none", 0.5, format="onnx")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    with pytest.raises(ConfigError, match="torch.export cannot trace"):  # the all-depth graph needs torch.cond
        _timm_vit().save_export(tmp_path / "all", "all", format="onnx")


class _CondConvBlock(torch.nn.Module):
    """A residual block with timm's CondConv2d (EfficientNet-CondConv): each image mixes its own kernel, and the
    convolution runs grouped by the batch, so ONNX (whose group count is constant) cannot take a dynamic batch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from timm.layers import CondConv2d

        self.route = torch.nn.Linear(channels, 2)
        self.conv = CondConv2d(channels, channels, 3, padding=1, num_experts=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x, torch.sigmoid(self.route(x.mean((2, 3))))))


def test_onnx_of_an_architecture_without_a_dynamic_batch_is_fixed_to_batch_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), *[_CondConvBlock(8) for _ in range(3)])
    net.append(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)))
    model = AdaptiveDepth.wrap(net, input_size=(3, 16, 16)).eval()
    x = torch.randn(1, 3, 16, 16)
    for s in (0.5, "all"):
        folder = model.save_export(tmp_path / str(s), s, format="onnx")
        described = json.loads((folder / "config.json").read_text())["adaptive_depth"]
        assert described["batch_size"] == 1
        assert "a batch of 1 only" in (folder / "README.md").read_text()
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        for i, factor in enumerate([s] if s == 0.5 else model.config.scaling_factors):
            feed = {"pixel_values": x.numpy()} | ({} if s == 0.5 else {"depth_index": np.array(i, dtype=np.int64)})
            np.testing.assert_allclose(session.run(None, feed)[0], _logits(model, x, factor), atol=1e-4)
        with pytest.raises(Exception, match="pixel_values"):  # the file says what it holds: one image a call
            session.run(None, feed | {"pixel_values": np.repeat(x.numpy(), 2, axis=0)})
    program = model.save_export(tmp_path / "pt2", 0.5, format="torch.export")  # torch.export takes any batch
    assert "batch_size" not in json.loads((program / "config.json").read_text())["adaptive_depth"]


def test_a_conversion_failure_names_the_operator_and_its_cause(tmp_path: Path) -> None:
    """torch.onnx's first line says only that converting failed; the refusal names what could not be translated."""
    from adaptive_depth.export_files import export_program, write_onnx
    from adaptive_depth.export_repo import _first_line

    block = _CondConvBlock(4).eval()
    with pytest.raises(Exception) as failed:  # a dynamic batch: ONNX cannot hold the group count constant
        write_onnx(export_program(block, (torch.randn(2, 4, 8, 8),)), tmp_path / "model.onnx")
    assert "Failed to convert" in str(failed.value).splitlines()[0]
    assert _first_line(failed.value).startswith("ConversionError: cannot translate torch.ops.aten.conv2d.default (")


class _WindowAttention(torch.nn.Module):
    """A residual block attending within windows on 5-D tensors (batch, heads, windows, tokens, channels), as Hiera
    does with its mask units."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, windows, tokens, channels)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)


def test_attention_on_five_dimensions_exports_to_onnx_with_every_depth(tmp_path: Path) -> None:
    """torch.onnx's converter translates attention on 4-D tensors only; the all-depth graph has no other route."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (4, 3)), torch.nn.Flatten(3), *[_WindowAttention(64) for _ in range(3)],
        torch.nn.Flatten(1), torch.nn.Linear(4 * 3 * 64, 3),
    )  # fmt: skip
    model = AdaptiveDepth.wrap(net, input_size=(12, 8, 8)).eval()
    folder = model.save_export(tmp_path / "all", "all", format="onnx")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 12, 8, 8)
    for i, s in enumerate(model.config.scaling_factors):
        feed = {"pixel_values": x.numpy(), "depth_index": np.array(i, dtype=np.int64)}
        np.testing.assert_allclose(session.run(None, feed)[0], _logits(model, x, s), atol=1e-4)


@pytest.mark.parametrize("case", ["plain", "scale", "bool mask", "float mask", "causal", "grouped heads"])
def test_attention_written_out_is_the_operator(case: str) -> None:
    from adaptive_depth.export_files import _attention_math

    torch.manual_seed(0)
    heads = 1 if case == "grouped heads" else 3  # (batch, windows, heads, tokens, channels): heads third from last
    q, k, v = torch.randn(2, 4, 3, 5, 8), torch.randn(2, 4, heads, 7, 8), torch.randn(2, 4, heads, 7, 8)
    kwargs: dict[str, object] = {
        "plain": {}, "scale": {"scale": 0.3}, "bool mask": {"attn_mask": torch.rand(5, 7) > 0.3},
        "float mask": {"attn_mask": torch.randn(2, 1, 3, 5, 7)}, "causal": {"is_causal": True},
        "grouped heads": {"enable_gqa": True},
    }[case]  # fmt: skip
    if case == "causal":
        k, v = k[..., :5, :], v[..., :5, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(_attention_math(q, k, v, **kwargs), want, atol=1e-5, rtol=1e-5)


def test_a_skipped_block_hands_on_the_feature_size_it_was_given() -> None:
    model = _mvitv2()
    gated = [b for st in model.stages for b in st.blocks if b.gateable]
    assert gated and all(b.output == "inputs" for b in gated)  # (tokens, [H, W]) in, the same out
    x = torch.randn(2, 3, 64, 64)
    for s in model.config.scaling_factors:
        with torch.no_grad():
            torch.testing.assert_close(model.export(s)(x), _logits(model, x, s))
