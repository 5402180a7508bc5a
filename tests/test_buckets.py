"""Bucket geometry: kohya's rule, checked by its properties for any resolution and image size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_core.buckets import bucket_resolutions, nearest_bucket


@pytest.mark.parametrize(("resolution", "max_reso"), [(512, 1024), (1024, 2048)])
def test_seed_presets_have_square_and_extreme_buckets(resolution, max_reso):
    buckets = bucket_resolutions(resolution, 256, max_reso, 64)
    assert (resolution, resolution) in buckets
    assert (256, min(max_reso, resolution * resolution // 256 // 64 * 64)) in buckets  # narrowest, tallest
    assert buckets == sorted(buckets) and len(set(buckets)) == len(buckets)


def test_sd15_buckets_count_and_members():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert (448, 576) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (512, 576) not in buckets  # over the area


@given(
    st.sampled_from([256, 320, 384, 448, 512, 576, 640, 768, 832, 896, 960, 1024]),
    st.sampled_from([32, 64]),
)
def test_every_bucket_obeys_the_rules(resolution, step):
    max_reso = 2 * resolution
    buckets = bucket_resolutions(resolution, 256, max_reso, step)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width * height <= resolution * resolution
        assert width % step == 0 and height % step == 0
        assert 256 <= width <= max_reso and 256 <= height <= max_reso
        assert (height, width) in buckets


@given(st.integers(256, 4000), st.integers(256, 4000), st.sampled_from([512, 1024]))
def test_nearest_bucket_minimises_aspect_error(width, height, resolution):
    buckets = bucket_resolutions(resolution)
    chosen = nearest_bucket((width, height), buckets)
    error = abs(chosen[0] / chosen[1] - width / height)
    assert all(error <= abs(b[0] / b[1] - width / height) for b in buckets)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"resolution": 512, "min_reso": 250}, "multiples"), ({"resolution": 2048, "max_reso": 1024}, "must lie")],
)
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bucket_resolutions(**kwargs)
