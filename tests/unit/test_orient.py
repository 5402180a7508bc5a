"""Orientation checks on real portraits: sideways photos turned upright, mirrored selfies found."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from lora_core.checks.face_models import face_models
from lora_core.config.settings import CheckSettings, IngestSettings, SubjectType
from lora_core.dataset.ingest import ingest
from lora_core.dataset.manifest import read_manifest
from lora_core.dataset.orient import find_rotation, mirror_consensus, orient_intact, orient_subject, turn
from lora_core.foundation.layout import SubjectLayout


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def crops(image: Image.Image, count: int, seed: int) -> list[Image.Image]:
    """Different framings of one portrait, each resized differently: what a user's set of one shoot looks like."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.72, 0.92))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, min(image.height - side, image.height // 6) + 1))
        scale = rng.uniform(1.1, 1.6)
        out.append(image.crop((left, top, left + side, top + side)).resize((int(side * scale), int(side * scale))))
    return out


@given(rotation=st.sampled_from([0, 90, 180, 270]), mirror=st.booleans())
def test_turn_is_undone_by_the_opposite_turn(rotation, mirror):
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    turned = turn(image, rotation, mirror)
    back = turn(turned.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else turned, (360 - rotation) % 360)
    assert same_pixels(back, image)
    assert turned.size == (image.size if rotation in (0, 180) else image.size[::-1])


@pytest.mark.parametrize("rotated_by", [0, 90, 180, 270])
def test_the_rotation_that_makes_a_face_upright_is_found(portraits, rotated_by):
    sideways = turn(portraits["astronaut"], rotated_by)
    rotation, faces = find_rotation(sideways, face_models())
    assert rotation == (360 - rotated_by) % 360
    assert faces, "the face is found once the photo is upright"


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(4, 24),
    noise=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_the_consensus_flags_exactly_the_minority_orientation(count, noise, seed, data):
    """Sign synchronisation on vectors with a shared direction: the flipped minority is found, whatever the noise."""
    rng = np.random.default_rng(seed)
    flipped = data.draw(st.sets(st.integers(0, count - 1), max_size=(count - 1) // 2 - (count % 2 == 0)))
    base = rng.normal(size=128)
    base /= np.linalg.norm(base)
    vectors = np.array([base + rng.normal(size=128) * noise / np.sqrt(128) for _ in range(count)])
    signs = np.array([-1.0 if i in flipped else 1.0 for i in range(count)])
    verdicts = mirror_consensus(vectors * signs[:, None])
    assert {i for i, v in enumerate(verdicts) if v.mirrored} == flipped
    assert all(v.score > 0 for i, v in enumerate(verdicts) if i not in flipped)


def test_the_consensus_needs_three_faces():
    with pytest.raises(ValueError, match="at least 3"):
        mirror_consensus(np.ones((2, 128)))


@pytest.fixture(scope="module")
def mirrored_set(tmp_path_factory, portraits):
    """Eight crops of one real portrait, numbers 2 and 5 mirrored; ingested."""
    root = tmp_path_factory.mktemp("mirrored")
    photos = root / "photos"
    photos.mkdir()
    originals = {}
    for i, image in enumerate(crops(portraits["astronaut"], 8, seed=11)):
        originals[f"crop-{i}.png"] = image
        (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i in (2, 5) else image).save(photos / f"crop-{i}.png")
    layout = SubjectLayout(root / "work", "c0ll1ns")
    ingested = ingest(photos, layout, show_progress=False)
    return layout, ingested.rows, originals


def training_image(layout: SubjectLayout, source: str) -> Image.Image | None:
    row = read_manifest(layout.manifest).set_index("source").loc[source]
    return Image.open(layout.root / row["image"]) if row["image"] else None


def test_mirrored_crops_are_flagged_fixed_or_rejected_by_policy(mirrored_set):
    layout, rows, originals = mirrored_set
    mirrored = {"crop-2.png", "crop-5.png"}

    flagged = orient_subject(layout, rows, CheckSettings(), show_progress=False)
    frame = read_manifest(layout.manifest).set_index("source")
    assert set(frame.index[frame["flags"].str.contains("mirrored")]) == mirrored
    assert (frame.loc[sorted(mirrored), "mirror_score"] < 0).all()
    assert (frame.drop(index=sorted(mirrored))["mirror_score"] > 0).all()
    assert flagged.mirrored == 2 and flagged.fixed == 0 and "crop-2.png" in " ".join(flagged.notes)
    assert same_pixels(
        training_image(layout, "crop-2.png"), originals["crop-2.png"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    )
    assert orient_intact(layout, rows, CheckSettings(), SubjectType.person)
    assert not orient_intact(layout, rows, CheckSettings(mirror_policy="fix"), SubjectType.person)

    fixed = orient_subject(layout, rows, CheckSettings(mirror_policy="fix"), show_progress=False)
    assert fixed.fixed == 2
    for source, original in originals.items():
        assert same_pixels(training_image(layout, source), original), f"{source} is as shot after the fix"
    assert orient_intact(layout, rows, CheckSettings(mirror_policy="fix"), SubjectType.person)
    edited = layout.root / read_manifest(layout.manifest).set_index("source").loc["crop-0.png", "image"]
    written = edited.read_bytes()
    training_image(layout, "crop-0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited)
    assert not orient_intact(layout, rows, CheckSettings(mirror_policy="fix"), SubjectType.person), "edited"
    edited.write_bytes(written)

    rejected = orient_subject(layout, rows, CheckSettings(mirror_policy="reject"), show_progress=False)
    frame = read_manifest(layout.manifest).set_index("source")
    assert rejected.rejected == 2
    assert set(frame.index[frame["status"] == "rejected"]) == mirrored
    assert frame.loc["crop-2.png", "reason"].startswith("dataset checks: looks mirrored")
    assert len(list(layout.class_dir(ingested_repeats(layout)).glob("*.png"))) == 6

    orient_subject(layout, rows, CheckSettings(), show_progress=False)  # back to flag: the photos return
    assert same_pixels(
        training_image(layout, "crop-5.png"), originals["crop-5.png"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    )
    assert len(list(layout.class_dir(ingested_repeats(layout)).glob("*.png"))) == 8


def ingested_repeats(layout: SubjectLayout) -> int:
    (folder,) = [p for p in layout.training_images.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return int(folder.name.split("_")[0])


def test_a_set_rotated_by_90_degrees_is_turned_upright(tmp_path, portraits):
    """Six sideways photos (no EXIF: only the pixels tell), two of them also mirrored."""
    photos = tmp_path / "photos"
    photos.mkdir()
    upright = crops(portraits["obama-1"], 6, seed=5)
    for i, image in enumerate(upright):
        turn(turn(image, 0, mirror=i in (1, 4)), 90).save(photos / f"side-{i}.png")
    layout = SubjectLayout(tmp_path / "work", "obama")
    ingested = ingest(photos, layout, IngestSettings(near_duplicate_distance=2), show_progress=False)
    result = orient_subject(layout, ingested.rows, CheckSettings(mirror_policy="fix"), show_progress=False)
    assert result.rotated == 6 and result.mirrored == 2
    frame = read_manifest(layout.manifest).set_index("source")
    assert set(frame["rotation"]) == {270} and (frame["decision"] == "fixed").all()
    for i, image in enumerate(upright):
        assert same_pixels(training_image(layout, f"side-{i}.png"), image), "upright and as shot"
        assert (frame.loc[f"side-{i}.png", "width"], frame.loc[f"side-{i}.png", "height"]) == image.size

    # Left sideways, the mirror fix still flips the face left-right as seen upright.
    orient_subject(layout, ingested.rows, CheckSettings(fix_rotation=False, mirror_policy="fix"), show_progress=False)
    for i, image in enumerate(upright):
        assert same_pixels(training_image(layout, f"side-{i}.png"), turn(image, 90))
    assert read_manifest(layout.manifest)["flags"].str.startswith("sideways").all()

    orient_subject(layout, ingested.rows, CheckSettings(fix_rotation=False), show_progress=False)
    assert same_pixels(training_image(layout, "side-1.png"), turn(turn(upright[1], 0, mirror=True), 90)), "undone"

    flagged = orient_subject(layout, ingested.rows, CheckSettings(), show_progress=False)  # turned, not flipped
    assert flagged.rotated == 6 and flagged.mirrored == 2 and "(kept as they are)" in " ".join(flagged.notes)
    assert same_pixels(training_image(layout, "side-1.png"), turn(upright[1], 0, mirror=True))
    assert same_pixels(training_image(layout, "side-0.png"), upright[0])


def test_one_new_photo_is_the_only_one_analysed_again(mirrored_set, counting_faces, tmp_path, portraits):
    layout, rows, _ = mirrored_set
    orient_subject(layout, rows, CheckSettings(), models=counting_faces, show_progress=False)
    assert counting_faces.detections == 0, "every photo's analysis comes from the cache"

    # The same eight photos plus one new one, ingested again (ingest renumbers them).
    photos = tmp_path / "photos"
    shutil.copytree(layout.workdir.parent / "photos", photos)
    portraits["astronaut"].resize((700, 700)).save(photos / "new.png")  # the whole frame: not a near-duplicate
    again = ingest(photos, layout, show_progress=False)
    assert {row["source"]: row["status"] for row in again.rows}["new.png"] == "accepted"
    result = orient_subject(layout, again.rows, CheckSettings(), models=counting_faces, show_progress=False)
    assert 1 <= counting_faces.detections <= 4, "only the new photo is analysed (up to four rotations)"
    assert result.mirrored == 2


def test_a_photo_rejected_on_the_first_run_comes_back(tmp_path, portraits):
    photos = tmp_path / "photos"
    photos.mkdir()
    originals = crops(portraits["astronaut"], 7, seed=21)
    for i, image in enumerate(originals):
        (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i == 3 else image).save(photos / f"p-{i}.png")
    layout = SubjectLayout(tmp_path / "work", "back")
    rows = ingest(photos, layout, IngestSettings(near_duplicate_distance=2), show_progress=False).rows
    rejected = orient_subject(layout, rows, CheckSettings(mirror_policy="reject"), show_progress=False)
    assert rejected.rejected == 1 and training_image(layout, "p-3.png") is None
    kept = orient_subject(layout, rows, CheckSettings(), SubjectType.object, show_progress=False)
    assert kept.rejected == 0
    assert same_pixels(training_image(layout, "p-3.png"), originals[3].transpose(Image.Transpose.FLIP_LEFT_RIGHT))

    # Leaving the mirrored photos out must not go under the minimum: then they are kept, and it says so.
    floor = orient_subject(layout, rows, CheckSettings(mirror_policy="reject"), min_images=7, show_progress=False)
    assert floor.rejected == 0 and floor.mirrored == 1
    assert "1 mirrored image(s) kept: leaving them out would leave 6, under the minimum of 7" in floor.notes


def test_no_face_checks_for_an_object(tmp_path, make_photo):
    photos = tmp_path / "photos"
    for i in range(5):
        make_photo(photos / f"mug-{i}.jpg", seed=i)
    layout = SubjectLayout(tmp_path / "work", "mug")
    ingested = ingest(photos, layout, show_progress=False)
    result = orient_subject(layout, ingested.rows, CheckSettings(), SubjectType.object, show_progress=False)
    assert result.rotated == result.mirrored == 0 and not result.mirror_consensus
    assert "subject type is object" in result.notes[0]
    assert (read_manifest(layout.manifest)["decision"] == "keep").all()


def test_too_few_faces_for_a_consensus_is_said(tmp_path, portraits, make_photo):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(crops(portraits["astronaut"], 2, seed=3)):
        image.save(photos / f"face-{i}.png")
    for i in range(3):
        make_photo(photos / f"noface-{i}.jpg", seed=50 + i)
    layout = SubjectLayout(tmp_path / "work", "few")
    ingested = ingest(photos, layout, show_progress=False)
    result = orient_subject(layout, ingested.rows, CheckSettings(), show_progress=False)
    assert not result.mirror_consensus
    assert any("mirroring not checked: 2 photo(s) with a face" in note for note in result.notes)
    assert read_manifest(layout.manifest)["mirror_score"].isna().all()
