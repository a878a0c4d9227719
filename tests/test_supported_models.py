"""docs/supported-models.md is generated: a sample of its rows, checked again, must say what the code says now."""

from __future__ import annotations

import re

import pytest

from adaptive_depth import AdaptiveDepth
from scripts import ROOT, load_script

PAGE = ROOT / "docs" / "supported-models.md"
WALK = load_script("scripts/supported_models.py")
PAGE_FORMAT = load_script("scripts/supported_models_page.py")
EXPORTS_SAMPLE = "timm:test_vit"  # the cheapest wrapping model to export in every format (tens of seconds)


def _rows() -> dict[str, dict[str, str]]:
    """The page's per-model rows by ``source:name``."""
    return {f"{r['source']}:{r['name']}": r for r in PAGE_FORMAT.parse_page(PAGE)[1]}


def _sample() -> list[str]:
    """The always-checked rows, and every 6th small timm model (under 2 M parameters): a few seconds each."""
    rows = _rows()
    small = sorted(k for k, r in rows.items() if k.startswith("timm:") and r["params_m"] and float(r["params_m"]) < 2)
    return [*PAGE_FORMAT.ALWAYS, *(k for k in small[::6] if k not in PAGE_FORMAT.ALWAYS)]


def test_the_page_says_which_commit_and_command_made_it() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert re.search(r"^- generated at commit: [0-9a-f]{7,}", text, re.M), "regenerate: scripts/supported_models.py"
    assert "- command: `python scripts/supported_models.py" in text
    assert "FLOPs at s=0.5" in text
    # the exports column says how it was made, and covers the models the sample below and the docs rely on
    assert re.search(r"^- exports column: generated at commit: [0-9a-f]{7,}", text, re.M)
    header = PAGE_FORMAT.parse_page(PAGE)[0]  # what --update-exports --only-missing carries over to the new page
    assert [line for line in header if line.startswith("- exports column: command: ")], header
    assert all(_rows()[key].get("exports") for key in PAGE_FORMAT.ALWAYS)
    unchecked = [f for f, members in PAGE_FORMAT.families(list(_rows().values())).items() if not any(
        r.get("exports") for r in members)]  # fmt: skip
    assert not unchecked, f"families without an exports cell: {unchecked}; run --update-exports --only-missing"


def test_the_exports_column_is_what_save_export_does_today() -> None:
    found = WALK.check(*EXPORTS_SAMPLE.split(":"), max_params_m=60.0, exports=True)
    assert _rows()[EXPORTS_SAMPLE]["exports"] == found["exports"] == "repo, torch.export, ONNX"


@pytest.mark.parametrize("key", _sample())
def test_a_sampled_row_matches_discovery_today(key: str) -> None:
    page = _rows()[key]
    source, name = key.split(":", 1)
    found = WALK.check(source, name, max_params_m=60.0)
    stale = f"docs/supported-models.md is stale for {key}: run scripts/supported_models.py again"
    assert (page["status"], page.get("reason", "")) == (found["status"], found.get("reason", "")), stale
    if found["status"] == "wraps":
        for column in ("method", "gates", "stages", "blocks", "gateable", "kept_at_half"):
            assert page[column] == str(found[column]), f"{stale} ({column})"
        assert float(page["flops_at_half"]) == pytest.approx(found["flops_at_half"], abs=0.002), stale


@pytest.mark.parametrize("name", ["resnet18", "repvit_m0_9"])  # whole blocks; residual branches
def test_the_flops_column_is_what_the_model_costs_at_half_depth(name: str) -> None:
    """The walk subtracts the skipped units' FLOPs from one counted pass; running the model at s = 0.5 agrees."""
    row = WALK.check("timm", name, max_params_m=60.0)
    model = AdaptiveDepth.from_pretrained(name, pretrained=False)
    assert row["flops_at_half"] == round(model.flops(0.5) / model.flops(1.0), 3)


def test_only_missing_carries_on_where_the_exports_column_stopped() -> None:
    """``--update-exports --only-missing`` checks the families with no exports cell and keeps the cells there are."""
    rows = [
        {"source": "timm", "name": n, "status": "wraps", "params_m": p, **({"exports": "ONNX"} if done else {})}
        for n, p, done in [("resnet18", "11.7", True), ("resnet50", "25.6", False), ("vit_small_patch16_224", "22", 0)]
    ]
    grouped = PAGE_FORMAT.families(rows)  # resnet18 and resnet50 share timm's resnet module, smallest first
    expected = {("timm", "resnet"): ["resnet18", "resnet50"], ("timm", "vision_transformer"): ["vit_small_patch16_224"]}
    assert {f: [r["name"] for r in m] for f, m in grouped.items()} == expected
    everything = PAGE_FORMAT.export_targets(rows)
    missing = PAGE_FORMAT.export_targets(rows, only_missing=True)
    assert ("timm", "resnet18") in everything and ("timm", "resnet18") not in missing  # its family is done
    assert ("timm", "vit_small_patch16_224") in missing
    assert ("timm", "resnet50") not in missing  # not its family's smallest
    # --every-model: the families first, then the other models, and the carry-on skips what has a cell
    assert PAGE_FORMAT.export_targets(rows, True, every_model=True)[-2:] == [
        ("timm", "vit_small_patch16_224"),
        ("timm", "resnet50"),
    ]
    # --filter: every wrapping model it names, the smallest of its family or not, and no other
    assert PAGE_FORMAT.export_targets(rows, pattern="resnet*") == [("timm", "resnet18"), ("timm", "resnet50")]
    assert WALK._with_exports(rows[0], None, keep=True)["exports"] == "ONNX"
    assert "exports" not in WALK._with_exports(rows[0], None)  # a fresh column drops what it did not check


def test_a_fresh_walk_keeps_the_exports_cells_of_models_that_still_wrap() -> None:
    old = [
        {"source": "timm", "name": "resnet18", "status": "wraps", "flops_at_half": "0.6", "exports": "repo, ONNX"},
        {"source": "timm", "name": "vit_tiny", "status": "wraps", "flops_at_half": "0.5", "exports": "ONNX"},
    ]
    fresh = [
        {"source": "timm", "name": "resnet18", "status": "wraps", "flops_at_half": "0.61"},
        {"source": "timm", "name": "vit_tiny", "status": "error", "reason": "ImportError"},
        {"source": "timm", "name": "new_net", "status": "wraps", "flops_at_half": "0.4"},
    ]
    kept = WALK._keep_exports(fresh, old)
    assert kept[0] == fresh[0] | {"exports": "repo, ONNX"}  # counted again, its exports cell kept
    assert "exports" not in kept[1] and "exports" not in kept[2]  # no longer wraps; never checked
