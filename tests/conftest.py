"""Shared fixtures: synthetic photos, the demo set, and one Prefect test harness."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO_PHOTOS = ROOT / "demo" / "photos"

# The embedded Prefect server must not try the network during tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def photo(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth random structure, distinct per seed (perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def make_photo() -> Callable[..., Path]:
    """Write a synthetic photo: make_photo(path, size=(w, h), seed=0, fmt="JPEG", mode=None, **save_params)."""

    def make(path: Path, size=(640, 480), seed=0, fmt="JPEG", mode=None, **params) -> Path:
        image = photo(size, seed)
        if mode:
            image = image.convert(mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, fmt, **params))
        return path

    return make


@pytest.fixture
def good_folder(tmp_path, make_photo) -> Path:
    """Six distinct, valid photos."""
    folder = tmp_path / "photos"
    for i in range(6):
        make_photo(folder / f"img{i}.jpg", seed=100 + i)
    return folder


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A writable copy of the bundled demo photos."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO_PHOTOS, target)
    return target


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect database and API for every flow test (slow to start: share it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
