"""Bucket geometry: kohya's rule, checked by its properties for any resolution and image size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.dataset.buckets import (
    BucketPlan,
    apply_bucket,
    bucket_counts,
    bucket_resolutions,
    bucket_subject,
    buckets_intact,
    nearest_bucket,
    read_buckets,
    short_buckets,
    write_buckets,
)
from lora_core.dataset.ingest import ingest
from lora_core.foundation.layout import SubjectLayout
from tests.conftest import photo

SD_SCRIPTS = json.loads((Path(__file__).resolve().parents[1] / "data" / "sd_scripts_buckets.json").read_text())


@pytest.mark.parametrize("case", SD_SCRIPTS["cases"], ids=lambda c: f"{c['resolution']}-{c['max_reso']}")
def test_same_buckets_and_choices_as_sd_scripts(case):
    """Golden data from sd-scripts' own functions (see the file's `source`), SD1.5 and SDXL settings."""
    buckets = bucket_resolutions(case["resolution"], case["min_reso"], case["max_reso"], case["step"])
    assert buckets == [tuple(b) for b in case["buckets"]]
    plan = BucketPlan(case["resolution"], case["min_reso"], case["max_reso"], case["step"], no_upscale=False)
    for size, bucket, resized in case["assignments"]:
        chosen = plan.assign("x.png", tuple(size))
        assert chosen.bucket == tuple(bucket), size
        assert (chosen.resized_width, chosen.resized_height) == tuple(resized), size


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


RESOLUTIONS = st.sampled_from([(512, 1024), (768, 1536), (1024, 2048)])


@given(st.integers(64, 5000), st.integers(64, 5000), RESOLUTIONS, st.sampled_from([256, 512]), st.booleans())
def test_assignment_obeys_every_rule(width, height, reso, min_reso, no_upscale):
    resolution, max_reso = reso
    plan = BucketPlan(resolution, min_reso, max_reso, 64, no_upscale=no_upscale)
    a = plan.assign("x.png", (width, height))
    bw, bh = a.bucket
    assert bw % 64 == 0 and bh % 64 == 0
    assert bw <= max_reso and bh <= max_reso
    # At least min_reso, unless the image itself is smaller and may not be enlarged.
    assert bw >= min_reso or (no_upscale and width < min_reso)
    assert bh >= min_reso or (no_upscale and height < min_reso)
    assert bw * bh <= resolution * resolution
    # The resize covers the bucket and keeps the aspect ratio to the rounding pixel.
    assert a.resized_width >= bw and a.resized_height >= bh
    assert abs(a.resized_width - width * a.scale) <= 1 and abs(a.resized_height - height * a.scale) <= 1
    assert min(a.resized_width - bw, a.resized_height - bh) <= 1  # one side fits exactly: no needless crop
    # The crop is the bucket, centred, and never leaves the resized image.
    assert a.crop_left >= 0 and a.crop_right <= a.resized_width and a.crop_right - a.crop_left == bw
    assert a.crop_top >= 0 and a.crop_bottom <= a.resized_height and a.crop_bottom - a.crop_top == bh
    assert abs((a.resized_width - a.crop_right) - a.crop_left) <= 1
    if not no_upscale:
        assert a.bucket == nearest_bucket((width, height), plan.buckets)
    else:
        # Never enlarged (64 px is one step: nothing is smaller); a picture that fills its nearest shared
        # bucket goes there.
        assert a.scale <= 1.0
        nearest = nearest_bucket((width, height), plan.buckets)
        if width >= nearest[0] and height >= nearest[1]:
            assert a.bucket == nearest


def test_small_image_gets_its_own_bucket_instead_of_being_enlarged():
    plan = BucketPlan(512, 256, 1024, 64, no_upscale=True)
    a = plan.assign("small.png", (300, 420))
    assert a.bucket == (256, 384) and a.scale <= 1.0
    enlarged = BucketPlan(512, 256, 1024, 64, no_upscale=False).assign("small.png", (300, 420))
    assert enlarged.bucket in bucket_resolutions(512) and enlarged.scale > 1.0
    # Smaller than min_bucket_reso (ingest allows 256 px, SDXL buckets start at 512 here): still not enlarged.
    sdxl = BucketPlan(1024, 512, 2048, 64, no_upscale=True).assign("small.png", (300, 400))
    assert sdxl.bucket == (256, 384) and sdxl.scale <= 1.0


@pytest.mark.parametrize("size", [(1600, 900), (640, 480), (300, 400)])
def test_disabled_bucketing_uses_one_square(size):
    plan = BucketPlan(512, 256, 1024, 64, enabled=False)
    assert plan.assign("x.png", size).bucket == (512, 512)


@settings(deadline=None)  # resizing a 1200 px photo can outlast 200 ms on a busy 2-core machine
@given(st.integers(256, 1200), st.integers(256, 1200))
def test_apply_bucket_yields_the_bucket_and_the_centre(width, height):
    plan = BucketPlan(512, 256, 1024, 64)
    a = plan.assign("x.png", (width, height))
    image = photo((width, height), seed=1)
    out = apply_bucket(image, a)
    assert out.size == a.bucket


def test_apply_bucket_keeps_the_centre_of_the_picture():
    # A wide picture, black with a white centre column: the crop must keep the column centred.
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1500, 500), "black")
    ImageDraw.Draw(image).rectangle((740, 0, 760, 499), fill="white")
    a = BucketPlan(512, 256, 1024, 64).assign("x.png", image.size)
    out = apply_bucket(image, a)
    row = [out.getpixel((x, out.height // 2))[0] for x in range(out.width)]
    white = [x for x, v in enumerate(row) if v > 128]
    assert abs((white[0] + white[-1]) / 2 - out.width / 2) <= 2


def test_apply_bucket_refuses_a_changed_image():
    a = BucketPlan().assign("x.png", (600, 800))
    with pytest.raises(ValueError, match="re-run the buckets stage"):
        apply_bucket(photo((800, 600), seed=1), a)


def test_buckets_csv_round_trip_and_short_buckets(tmp_path):
    plan = BucketPlan(512, 256, 1024, 64)
    sizes = [(512, 512), (1024, 1024), (600, 600), (640, 384), (1280, 768), (384, 640)]
    assignments = [plan.assign(f"{i:04d}.png", size) for i, size in enumerate(sizes, 1)]
    write_buckets(tmp_path / "buckets.csv", assignments)
    assert read_buckets(tmp_path / "buckets.csv") == assignments
    assert bucket_counts(assignments) == {(512, 512): 3, (640, 384): 2, (384, 640): 1}
    assert short_buckets(assignments, batch_size=2) == {(384, 640): 1}
    assert short_buckets(assignments, batch_size=1) == {}


def test_buckets_csv_with_a_crop_outside_is_refused(tmp_path):
    import dataclasses

    a = BucketPlan().assign("x.png", (800, 600))
    bad = dataclasses.replace(a, crop_left=a.crop_left + 10_000, crop_right=a.crop_right + 10_000)
    with pytest.raises(Exception, match="crop leaves"):
        write_buckets(tmp_path / "buckets.csv", [bad])


def test_bucket_stage_on_an_ingested_subject(tmp_path, make_photo):
    folder = tmp_path / "photos"
    sizes = [(640, 480), (640, 480), (480, 640), (1200, 600), (512, 512)]
    for i, size in enumerate(sizes):
        make_photo(folder / f"p{i}.jpg", size=size, seed=50 + i)
    layout = SubjectLayout(tmp_path / "work", "bk")
    ingest(folder, layout, show_progress=False)
    assert not buckets_intact(layout, BucketPlan())
    result = bucket_subject(layout, BucketPlan(), batch_size=2)
    assert result.counts == {"576x448": 2, "448x576": 1, "704x320": 1, "512x512": 1}
    assert result.short == {"448x576": 1, "704x320": 1, "512x512": 1}
    assert result.upscaled == 0 and result.own_buckets == 0
    assert [a.image for a in read_buckets(layout.buckets_csv)] == [r["image"] for r in result.rows]
    assert buckets_intact(layout, BucketPlan())
    assert not buckets_intact(layout, BucketPlan(enabled=False))  # other settings: the csv is stale
    # A training image replaced behind our back (another size) makes the csv stale.
    victim = layout.root / result.rows[0]["image"]
    photo((300, 300), 1).save(victim)
    from lora_core.dataset.manifest import read_manifest, write_manifest

    frame = read_manifest(layout.manifest)
    frame.loc[frame["image"] == result.rows[0]["image"], ["width", "height"]] = 300
    write_manifest(layout.manifest, frame.to_dict(orient="records"))
    assert not buckets_intact(layout, BucketPlan())
    assert bucket_subject(layout, BucketPlan(), batch_size=2).own_buckets == 1
