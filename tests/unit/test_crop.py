"""Crop and quality checks: each measure on real photos and their damaged copies, and the stage on a set."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from lora_core.config.settings import CheckSettings, IngestSettings, SubjectType
from lora_core.dataset.crop import (
    _grey,
    blockiness,
    count_guidance,
    crop_intact,
    crop_subject,
    framing,
    high_frequency_share,
    identity_distances,
    pixelation,
    sharpness,
    upscale_signature,
)
from lora_core.dataset.ingest import ingest
from lora_core.dataset.manifest import read_manifest
from lora_core.dataset.orient import orient_subject
from lora_core.foundation.layout import SubjectLayout
from tests.conftest import DEMO_PHOTOS


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(4))


def pixelated(image: Image.Image, block: int = 8) -> Image.Image:
    small = image.resize((image.width // block, image.height // block), Image.Resampling.BOX)
    return small.resize((small.width * block, small.height * block), Image.Resampling.NEAREST)


def upscaled(image: Image.Image, factor: int = 3) -> Image.Image:
    small = image.resize((image.width // factor, image.height // factor), Image.Resampling.LANCZOS)
    return small.resize((small.width * factor, small.height * factor), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


PHOTOS = ["astronaut", "obama-1", "obama-2"]


@pytest.mark.parametrize("name", PHOTOS)
def test_blur_lowers_sharpness_by_far(portraits, name):
    clean = sharpness(_grey(portraits[name]))
    assert sharpness(_grey(blurred(portraits[name]))) < 0.05 * clean


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("block", [4, 8, 13])
def test_pixelation_is_found_with_its_block_size(portraits, name, block):
    score, size = pixelation(_grey(pixelated(portraits[name], block)))
    assert score > 0.9 and size == block
    for other in (portraits[name], jpeg(portraits[name], 10), upscaled(portraits[name])):
        assert pixelation(_grey(other))[0] < 0.3


@pytest.mark.parametrize("name", PHOTOS)
def test_jpeg_blocks_are_found(portraits, name):
    assert blockiness(_grey(jpeg(portraits[name], 15))) > 1.4 > blockiness(_grey(portraits[name]))


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("factor", [1.5, 3])
def test_an_enlargement_leaves_a_trace_a_photo_and_a_reduction_do_not(portraits, name, factor):
    image = portraits[name]
    small = image.resize((int(image.width / factor), int(image.height / factor)), Image.Resampling.LANCZOS)
    enlarged = _grey(small.resize(image.size, Image.Resampling.BICUBIC))
    strength, frequency = upscale_signature(enlarged)
    assert strength > 15 and high_frequency_share(enlarged) < 0.08
    assert abs(frequency - (1 / factor) % 0.5) < 0.01 or abs(frequency - (1 - 1 / factor)) < 0.01
    assert upscale_signature(_grey(image))[0] < 15
    for shrink in (0.9, 2 / 3, 0.5):  # a reduction (as ingest makes of large photos) is not an enlargement
        reduced = _grey(image.resize((int(image.width * shrink), int(image.height * shrink)), Image.Resampling.LANCZOS))
        assert upscale_signature(reduced)[0] < 15 or high_frequency_share(reduced) >= 0.08


@given(share=st.floats(0, 1))
def test_framing_bands(share):
    kind = framing(share)
    assert kind == ("portrait" if share >= 0.18 else "half body" if share >= 0.07 else "full body")


@given(count=st.integers(0, 500))
def test_count_guidance_follows_the_seeds_table(count):
    text = count_guidance(count)
    assert text.startswith(f"{count} images")
    expected = (
        "too few"
        if count < 5
        else "5-10"
        if count <= 10
        else "11-20"
        if count <= 20
        else "21-50"
        if count <= 50
        else "50-100"
        if count <= 100
        else "waste"
    )
    assert expected in text


def test_identity_distance_singles_out_another_person(portraits):
    from lora_core.checks.face_models import face_models

    models = face_models()
    descriptors = []
    for image in [portraits["obama-1"], portraits["obama-2"], portraits["obama-3"], portraits["astronaut"]]:
        rgb = np.asarray(image)
        descriptors.append(models.descriptor(models.chip(rgb, models.detect(rgb)[0])))
    distances = identity_distances(np.array(descriptors))
    assert distances[3] > 0.6 > max(distances[:3])


@pytest.fixture(scope="module")
def problem_set(tmp_path_factory, portraits):
    """Real photos of one person, each problem once, and clean ones; ingested and orientation-checked."""
    root = tmp_path_factory.mktemp("quality")
    photos = root / "photos"
    photos.mkdir()
    o1, o2, o3 = (portraits[n] for n in ("obama-1", "obama-2", "obama-3"))
    o3 = o3.resize((o3.width * 1000 // o3.height, 1000))
    clean = {"clean-1.png": o1, "clean-2.png": o2, "clean-3.png": o3}
    for name, image in clean.items():
        image.save(photos / name)
    two = Image.new("RGB", (o1.width * 2, o1.height), "white")
    two.paste(o1, (0, 0))
    two.paste(o2.resize((o2.width * o1.height // o2.height, o1.height)), (o1.width, 0))
    two.save(photos / "two-faces.png")
    shutil.copy(DEMO_PHOTOS / "obama-4-crop.jpg", photos / "face-cut.jpg")  # a real crop through the face
    blurred(o2.crop((0, 0, o2.width, o2.height * 3 // 4))).save(photos / "blurred.png")
    pixelated(o3.crop((0, 0, o3.width, o3.height * 3 // 4))).save(photos / "pixelated.png")
    upscaled(o1.crop((150, 0, o1.width, o1.height * 3 // 4))).save(photos / "upscaled.png")
    portraits["astronaut"].resize((768, 768)).save(photos / "someone-else.png")
    layout = SubjectLayout(root / "work", "obama")
    ingested = ingest(photos, layout, IngestSettings(near_duplicate_distance=0), show_progress=False)
    assert all(row["status"] == "accepted" for row in ingested.rows)
    checked = orient_subject(layout, ingested.rows, CheckSettings(), show_progress=False)
    return layout, checked.rows


def flags_by_source(layout: SubjectLayout) -> dict[str, set[str]]:
    frame = read_manifest(layout.manifest)
    return {row.source: set(filter(None, row.flags.split(";"))) - {"mirrored", "rotated"} for row in frame.itertuples()}


def test_each_problem_is_flagged_with_its_reason_and_clean_photos_are_not(problem_set):
    layout, rows = problem_set
    result = crop_subject(layout, rows, CheckSettings(), show_progress=False)
    flags = flags_by_source(layout)
    assert flags["clean-1.png"] == flags["clean-2.png"] == flags["clean-3.png"] == set()
    assert "other_faces" in flags["two-faces.png"]
    assert "face_cut" in flags["face-cut.jpg"]
    assert "blurred" in flags["blurred.png"]
    assert "pixelated" in flags["pixelated.png"] and "jpeg_blocky" not in flags["pixelated.png"]
    assert "upscaled" in flags["upscaled.png"] and "blurred" not in flags["upscaled.png"]
    assert "other_person" in flags["someone-else.png"]
    frame = read_manifest(layout.manifest).set_index("source")
    assert frame.loc["face-cut.jpg", "check_notes"].endswith("the face is cut by the left border")
    assert frame.loc["two-faces.png", "faces"] == 2 and frame.loc["clean-1.png", "faces"] == 1
    assert frame.loc["clean-1.png", "framing"] == "portrait"
    assert (frame["decision"] != "rejected").all() and result.rejected == 0
    assert result.flagged == 6 and result.kept == 9
    assert "1 image(s) look pixelated: pixelated.png" in result.notes
    assert result.guidance.startswith("9 images: enough")
    assert crop_intact(layout, rows, CheckSettings(), SubjectType.person)
    assert not crop_intact(layout, rows, CheckSettings(quality_policy="reject"), SubjectType.person)


def test_reject_policy_leaves_flagged_photos_out_and_flag_brings_them_back(problem_set):
    layout, rows = problem_set
    result = crop_subject(layout, rows, CheckSettings(quality_policy="reject"), min_images=3, show_progress=False)
    frame = read_manifest(layout.manifest).set_index("source")
    assert result.rejected == 6 and result.kept == 3
    assert frame.loc["blurred.png", "status"] == "rejected" and frame.loc["blurred.png", "image"] == ""
    assert frame.loc["blurred.png", "reason"].startswith("dataset checks: blurred")
    training = sorted(p.name for p in next(layout.training_images.glob("*_obama")).glob("*.png"))
    assert len(training) == 3

    strict = crop_subject(layout, rows, CheckSettings(quality_policy="reject"), show_progress=False)  # min 5
    assert strict.rejected == 0 and "under the minimum of 5" in strict.notes[0]

    crop_subject(layout, rows, CheckSettings(), show_progress=False)
    assert len(list(next(layout.training_images.glob("*_obama")).glob("*.png"))) == 9


def test_measures_are_cached_per_image(problem_set, counting_faces):
    layout, rows = problem_set
    crop_subject(layout, rows, CheckSettings(), models=counting_faces, show_progress=False)
    assert counting_faces.detections == 0


def test_an_object_gets_image_checks_only(problem_set):
    layout, rows = problem_set
    crop_subject(layout, rows, CheckSettings(), SubjectType.object, show_progress=False)
    flags = flags_by_source(layout)
    assert flags["pixelated.png"] == {"pixelated"} and flags["two-faces.png"] == set()  # no face checks
    assert read_manifest(layout.manifest)["faces"].isna().all()
