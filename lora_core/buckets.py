"""Aspect-ratio buckets: the same bucket set kohya sd-scripts makes, so images keep their framing.

The rule (sd-scripts `make_bucket_resolutions`): every bucket holds at most
resolution² pixels; sides are multiples of `step` between `min_reso` and
`max_reso`; the square bucket is always there; each bucket's transpose too.
An image goes to the bucket whose aspect ratio is nearest its own.

This module is the pure geometry; the bucketing stage (resize, crop,
`buckets.csv`) builds on it.
"""

from __future__ import annotations

import math

__all__ = ["bucket_resolutions", "nearest_bucket"]


def bucket_resolutions(
    resolution: int, min_reso: int = 256, max_reso: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """Sorted `(width, height)` buckets for a square training `resolution`.

    `max_reso` defaults to twice the resolution (1024 for SD1.5 at 512, 2048 for
    SDXL at 1024, the seed's range).
    """
    max_reso = max_reso if max_reso is not None else 2 * resolution
    if step < 1 or min_reso % step or max_reso % step:
        raise ValueError(f"min_reso {min_reso} and max_reso {max_reso} must be multiples of step {step}")
    if not min_reso <= resolution <= max_reso:
        raise ValueError(f"resolution {resolution} must lie between min_reso {min_reso} and max_reso {max_reso}")
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        # The tallest multiple of `step` that keeps width x height within the area.
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest `size`'s; ties go to the first in sorted order."""
    aspect = size[0] / size[1]
    return min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - aspect))
