"""Shared fixtures. The whole suite runs offline against a Hub cache it lays out itself."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Before huggingface_hub is imported anywhere: an empty private cache, and no network, exactly as for a
# user with HF_HUB_OFFLINE=1. Every Hub test fills this cache with models it builds and saves itself.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="adaptive-depth-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)

import pytest
import torch
from huggingface_hub import constants


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hub_repo() -> Callable[[str, Path], Path]:
    """Lay out files as a cached Hub repo: ``HF_HOME/hub/models--ORG--NAME/{refs/main,snapshots/<sha>/}``."""
    made: list[Path] = []

    def add(repo_id: str, folder: Path) -> Path:
        repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        commit = os.urandom(20).hex()
        snapshot = repo_dir / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        made.append(repo_dir)
        return snapshot

    yield add
    for repo_dir in made:
        shutil.rmtree(repo_dir, ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ``imagefolder`` dataset on disk: class subfolders ``kind0..kind2`` of 4 small PNGs each."""
    from PIL import Image

    root = tmp_path / "images"
    for c in range(3):
        (root / f"kind{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), (60 * c, 20 * i, 0)).save(root / f"kind{c}" / f"{i}.png")
    return root


@pytest.fixture
def fake_hub_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, object], Path]:
    """Replace only the network boundary of ``push_to_hub`` (``HfApi.create_repo`` / ``upload_folder``).

    Saving, the card and the upload call stay the real ones; what would be uploaded is copied to the returned
    folder, and ``calls`` records the repo id each network call got.
    """
    from huggingface_hub import HfApi

    uploaded = tmp_path / "uploaded"
    calls: dict[str, object] = {}

    class _Repo:
        def __init__(self, repo_id: str) -> None:
            self.repo_id = repo_id

    def create_repo(self: HfApi, repo_id: str, **kwargs: object) -> _Repo:
        calls["create_repo"] = repo_id
        return _Repo(repo_id)

    def upload_folder(self: HfApi, *, repo_id: str, folder_path: str, **kwargs: object) -> str:
        calls["upload_folder"] = repo_id
        shutil.copytree(folder_path, uploaded)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls, uploaded
