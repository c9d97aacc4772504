"""Shared fixtures: a tiny random VideoMAE checkpoint, sample videos, one local Ray for the session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3server"]

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "videoindex" / "samples"
SHARED_VIDEOS = REPO.parent / "shared" / "videos"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import make_tiny_videomae

    return make_tiny_videomae(tmp_path_factory.mktemp("tiny-videomae"))


@pytest.fixture()
def ray_session():
    """One local Ray shared by the tests that need it (starting Ray costs seconds), set up as
    ``videoindex run`` starts a local Ray.

    Fault tests shut it down to start a multi-node cluster; the next user starts it again.
    """
    import ray

    from videoindex.runner import ray_system_config

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, _system_config=ray_system_config())  # fmt: skip
    return ray


@pytest.fixture()
def sample_videos(tmp_path: Path) -> Path:
    """Two small real sample videos in their own input directory."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("demo.mp4", "carphone_pristine.mp4"):
        shutil.copy(SAMPLES / name, folder / name)
    return folder
