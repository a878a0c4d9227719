"""Every Python block of README.md and docs/*.md runs, offline, so a snippet that fails or loads the wrong weights is
caught.

A block runs as written, in a temporary folder, with the blocks before it in the same file (one namespace per file,
as a reader runs them), offline against this suite's private Hub cache. An HTML comment right above a block's fence
(invisible on the rendered page, visible in its source) says what else the test does, one instruction a line:

    <!-- docs-test
    setup: <one Python statement, run before the block>     (the helpers below and the fixtures are in scope)
    replace: <text in the block> => <what the test runs instead>   (the text must be there: a stale one fails)
    check: <a Python expression that must be true after the block>
    -->

or ``<!-- docs-test: skip: <why it cannot run here> -->``. Repositories a snippet loads from the Hub are laid out in
the offline cache first by ``setup: stand_in(...)`` / ``stand_in_adaptive(...)``: small random-weight models saved
under the snippet's own ids, loaded by the real code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import transformers
from PIL import Image

from adaptive_depth import AdaptiveDepth
from scripts import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMENT = re.compile(r"<!-- docs-test(:?)(.*?)-->", re.S)


@dataclass
class Block:
    """One fenced Python block and the instructions of the comment above it."""

    where: str
    code: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)
    check: list[str] = field(default_factory=list)


def python_blocks(path: Path) -> list[Block]:
    """The Python blocks of a markdown file, with the ``docs-test`` comment right above each (if any)."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for fence in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, fence.start()) + 1
        block = Block(f"{path.name}:{line}", fence.group(1))
        before = text[: fence.start()].rstrip()
        comment = next((m for m in COMMENT.finditer(before) if m.end() == len(before)), None)
        body = comment.group(2).strip() if comment else ""
        one_line = comment is not None and comment.group(1) == ":"  # "docs-test: skip: ...", wrapped as it may be
        lines = [" ".join(body.split())] if one_line else body.splitlines()
        for instruction in lines:
            key, _, value = instruction.strip().partition(": ")
            if key == "skip":
                block.skip = value
            elif key == "setup":
                block.setup.append(value)
            elif key == "replace":
                old, _, new = value.partition(" => ")
                block.replace.append((old, new))
            elif key == "check":
                block.check.append(value)
            else:
                raise AssertionError(f"{block.where}: unknown docs-test instruction {instruction!r}")
        blocks.append(block)
    return blocks


def _helpers(hub_repo: Any, folder: Path) -> dict[str, Any]:
    """What ``setup:`` lines can call, beside the usual imports."""

    def stand_in(repo_id: str, architecture: str, **kwargs: Any) -> None:
        """A timm model with random weights, saved in the offline Hub cache as ``repo_id`` (``timm/<name>``)."""
        saved = folder / "stand-ins" / repo_id
        timm.models.save_for_hf(timm.create_model(architecture, **kwargs), str(saved), safe_serialization=True)
        hub_repo(repo_id, saved)

    def stand_in_adaptive(repo_id: str, architecture: str, labels: list[str], **kwargs: Any) -> None:
        """A small adaptive model (random weights, per-depth statistics, class names) saved as ``repo_id``."""
        model = AdaptiveDepth.from_pretrained(architecture, pretrained=False, num_classes=len(labels), **kwargs)
        model.recalibrate_norms([torch.randn(4, *model.config.input_size) for _ in range(2)])
        model.set_labels(labels).save_pretrained(folder / "stand-ins" / repo_id)
        hub_repo(repo_id, folder / "stand-ins" / repo_id)

    def stand_in_transformers(repo_id: str, config: transformers.PretrainedConfig) -> None:
        """A transformers image classifier with random weights and an image processor, saved as ``repo_id``."""
        saved = folder / "stand-ins" / repo_id
        transformers.AutoModelForImageClassification.from_config(config).save_pretrained(saved)
        transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(saved)
        hub_repo(repo_id, saved)

    def image(path: str) -> None:
        Image.new("RGB", (64, 48), (200, 30, 90)).save(path)

    return {"stand_in": stand_in, "stand_in_adaptive": stand_in_adaptive,
            "stand_in_transformers": stand_in_transformers, "image": image, "AdaptiveDepth": AdaptiveDepth,
            "torch": torch, "timm": timm, "transformers": transformers}  # fmt: skip


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_python_block_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_repo: Any, fake_hub_upload: Any
) -> None:
    blocks = python_blocks(path)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs", **_helpers(hub_repo, tmp_path)}
    for block in blocks:
        if block.skip is not None:
            assert block.skip, f"{block.where}: say why the block cannot run (docs-test: skip: <why>)"
            continue
        code = block.code
        for old, new in block.replace:
            assert old in code, f"{block.where}: docs-test replace: {old!r} is no longer in the block"
            code = code.replace(old, new)
        for line in block.setup:
            exec(compile(line, f"{block.where} setup", "exec"), namespace)
        try:
            exec(compile(code, block.where, "exec"), namespace)
        except Exception as e:
            raise AssertionError(
                f"{block.where} fails ({type(e).__name__}: {e}). Fix the snippet, or say above it how to run it "
                "offline (a docs-test comment, see tests/test_docs.py)"
            ) from e
        for expression in block.check:
            assert eval(expression, namespace), f"{block.where}: docs-test check failed: {expression}"
