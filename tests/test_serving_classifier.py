"""A serving worker without a server: request bodies to tensors, the policies, the profile it serves with."""

from __future__ import annotations

import base64
import io
import logging

import pytest
import timm
import torch
from PIL import Image

from adaptive_depth import AdaptiveDepth, ConfigError, LatencyProfile
from adaptive_depth.serving import DepthController, FixedDepth
from adaptive_depth.serving.classifier import ImageClassifier, PolicySpec, profile_batch_sizes, serving_profile
from adaptive_depth.serving.requests import BadRequestError, image_bytes, open_image


def _model() -> AdaptiveDepth:
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=3), input_size=[3, 32, 32]).eval()
    return model.set_labels(["cat", "dog", "bird"])


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(buffer, "PNG")
    return buffer.getvalue()


def test_profile_batch_sizes_are_powers_of_two_up_to_the_largest_batch() -> None:
    assert profile_batch_sizes(1) == [1]
    assert profile_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert profile_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_the_saved_profile_is_used_only_if_it_is_of_this_device_and_batch_sizes(caplog) -> None:
    model = _model()
    model.profile(batch_size=[1, 2, 4], warmup=0, repeats=1)
    mine = model.latency_profile
    with caplog.at_level(logging.WARNING):
        assert serving_profile(model, 4) == mine  # fits: not measured again
    assert not caplog.records
    model.config.latency_profile = LatencyProfile("cuda: other", mine.input_size, mine.dtype, mine.latency_ms).to_dict()
    with caplog.at_level(logging.WARNING):
        profile = serving_profile(model, 4, warmup=0, repeats=1)
    assert profile.device == mine.device and "measured on 'cuda: other' (float32)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert serving_profile(model, 8, warmup=0, repeats=1).batch_sizes == [1, 2, 4, 8]
    assert "no batch sizes [8]" in caplog.text


def test_policies_from_the_spec() -> None:
    model = _model()
    model.profile(batch_size=[1, 4], warmup=0, repeats=1)
    profile = model.latency_profile
    adaptive = PolicySpec(slo_ms=50, max_batch_size=4).build(model, profile)
    assert isinstance(adaptive, DepthController) and adaptive.scaling_factors == model.config.scaling_factors
    fixed = PolicySpec(slo_ms=50, scaling_factor=0.5, max_batch_size=4).build(model, profile)
    assert isinstance(fixed, FixedDepth) and fixed.scaling_factors == [0.5]
    # the static budget: the largest depth whose full batch (4) is measured within the budget
    budget = profile.at(0.5, 4) * 1.001
    chosen = PolicySpec(slo_ms=50, max_latency_ms=budget, max_batch_size=4).build(model, profile)
    expected = max(s for s in model.config.scaling_factors if profile.at(s, 4) <= budget)
    assert chosen.scaling_factors == [expected]
    assert [PolicySpec(slo_ms=50, **kw).name for kw in ({}, {"scaling_factor": 0.5}, {"max_latency_ms": 20})] == [
        "adaptive", "s=0.5", "budget=20ms"
    ]  # fmt: skip


def test_a_bad_spec_is_refused_before_a_worker_starts(tmp_path) -> None:
    for kwargs, message in [
        ({"slo_ms": 0}, "slo_ms must be a positive number, got 0"),
        ({"slo_ms": 50, "margin_ms": 60}, r"margin_ms must be in \[0, slo_ms=50\), got 60"),
        ({"slo_ms": 50, "max_batch_size": 0}, "max_batch_size must be a positive integer, got 0"),
        ({"slo_ms": 50, "scaling_factor": 0.5, "max_latency_ms": 9}, "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PolicySpec(**kwargs)
    with pytest.raises(ConfigError, match=r"trained at the depths \[0.25, 0.5, 0.75, 1.0\], not at scaling_factor=0.3"):
        PolicySpec(slo_ms=50, scaling_factor=0.3).check_depths([0.25, 0.5, 0.75, 1.0])
    pytest.importorskip("litserve")
    from adaptive_depth.serving.server import build_server

    _model().save_pretrained(tmp_path / "model")
    with pytest.raises(ConfigError, match="not at scaling_factor=0.3"):
        build_server(str(tmp_path / "model"), PolicySpec(slo_ms=50, scaling_factor=0.3))
    timm.models.save_for_hf(timm.create_model("test_convnext"), str(tmp_path / "timm"), safe_serialization=True)
    with pytest.raises(ConfigError, match="is a base model, not a saved adaptive-depth model"):
        build_server(str(tmp_path / "timm"), PolicySpec(slo_ms=50))


def test_a_worker_classifies_a_batch_at_the_depth_it_is_given() -> None:
    model = _model()
    model.profile(batch_size=[1, 2], warmup=0, repeats=1)
    worker = ImageClassifier(model, PolicySpec(slo_ms=50, max_batch_size=2), model.latency_profile, top_k=2)
    images = [worker.preprocess({"image": base64.b64encode(_png()).decode()}) for _ in range(2)]
    answers = worker.classify(images, 0.5)
    with torch.no_grad(), model.scaled(0.5):
        probs = model(torch.stack(images)).softmax(-1)
    top = probs[0].topk(2)
    assert answers[0]["scaling_factor"] == 0.5 and answers[0]["label"] == model.id2label[int(top.indices[0])]
    assert [a["label"] for a in answers[0]["top_k"]] == [model.id2label[int(i)] for i in top.indices]
    assert answers[0]["score"] == pytest.approx(float(top.values[0]))
    assert model.scaling_factor == 1.0  # switched for the batch only


def test_request_bodies_are_checked_with_the_reason() -> None:
    assert image_bytes({"image": base64.b64encode(b"abc").decode()}) == b"abc"
    for payload, status, reason in [
        ("text", 400, "a str, not an object"),
        ({"img": "x"}, 400, "no 'image' field (it has ['img'])"),
        ({"image": "***"}, 400, "not valid base64"),
        ({"image": 3}, 400, "the 'image' field is a int"),
    ]:
        with pytest.raises(BadRequestError) as err:
            image_bytes(payload)
        assert err.value.status_code == status and reason in err.value.reason
    with pytest.raises(BadRequestError, match="40x30 = 1200 pixels, more than this server's limit of 1000") as err:
        open_image(_png(), max_pixels=1000)
    assert err.value.status_code == 413
    with pytest.raises(BadRequestError, match="cannot be read") as err:
        open_image(_png()[:60])  # truncated
    assert err.value.status_code == 400
    assert open_image(_png()).size == (40, 30)
