"""Synthetic photo-like images for the benches and the tests: no files, nothing downloaded."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["photo"]


def photo(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth random structure, distinct per seed (perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
