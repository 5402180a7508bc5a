"""The variety check: real faces composited onto varied and uniform backgrounds and clothes, and mirrored."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image, ImageOps

import tasks.artifacts
from lora_core.checks.face_models import face_models
from lora_core.checks.variety import COLOUR_NAMES, background_colour, colour_name, yaw
from lora_core.config.settings import CheckSettings, IngestSettings, SubjectType
from lora_core.dataset.crop import crop_subject
from lora_core.dataset.ingest import ingest
from lora_core.dataset.manifest import read_manifest
from lora_core.dataset.orient import orient_subject
from lora_core.foundation.layout import SubjectLayout
from tests.unit.test_orient import crops

RGB = st.tuples(*[st.integers(0, 255)] * 3)


@given(rgb=RGB)
def test_every_colour_gets_one_coarse_name_and_greys_get_a_grey_one(rgb):
    assert colour_name(rgb) in COLOUR_NAMES
    level = rgb[0]
    assert colour_name((level, level, level)) in ("black", "grey", "white")


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((200, 30, 30), "red"),
        ((240, 140, 20), "orange"),
        ((120, 70, 20), "brown"),
        ((230, 220, 40), "yellow"),
        ((40, 160, 60), "green"),
        ((30, 190, 200), "cyan"),
        ((30, 60, 200), "blue"),
        ((120, 40, 170), "purple"),
        ((230, 100, 180), "pink"),
        ((20, 20, 20), "black"),
        ((128, 128, 128), "grey"),
        ((245, 245, 245), "white"),
    ],
)
def test_colour_names_are_the_words_a_user_shoots_by(rgb, name):
    assert colour_name(rgb) == name


@given(rgb=RGB, seed=st.integers(0, 2**16))
def test_the_background_is_the_frame_around_the_subject(rgb, seed):
    """A solid frame with anything in the middle: the background is the frame's colour, exactly."""
    canvas = np.empty((240, 200, 3), dtype=np.uint8)
    canvas[:] = rgb
    canvas[30:, 20:180] = np.random.default_rng(seed).integers(0, 256, (210, 160, 3), dtype=np.uint8)  # most of it
    assert tuple(background_colour(canvas, chin=150)) == rgb


@given(
    points=st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 1000)), min_size=5, max_size=5),
    width=st.floats(1200, 3000),
)
def test_mirrored_landmarks_turn_the_other_way(points, width):
    """yaw is odd under mirroring: the same face seen in a mirror turns as far, to the other side."""
    across = np.array(points[:2]).mean(axis=0) - np.array(points[2:4]).mean(axis=0)
    assume(abs(across[0]) > max(5, abs(across[1])))  # an upright face: the eyes side by side, not stacked
    mirrored = tuple((width - x, y) for x, y in points)
    assert yaw(mirrored) == pytest.approx(-yaw(tuple(points)), abs=1e-6)


@pytest.mark.parametrize("name", ["astronaut", "obama-2", "obama-3"])
def test_a_mirrored_photo_has_the_opposite_head_turn(portraits, name):
    models = face_models()
    turns = []
    for image in (portraits[name], ImageOps.mirror(portraits[name])):
        face = max(models.detect(np.asarray(image)), key=lambda f: f.width)
        turns.append(yaw(face.landmarks))
    assert turns[0] * turns[1] < 0 and abs(turns[0] + turns[1]) < 3
    if name != "astronaut":  # both Obama photos turn clearly, to opposite sides (see demo/photos)
        assert abs(turns[0]) > 15


def _head(image: Image.Image, face_width: int) -> Image.Image:
    """The head of the photo's main face, from above the hair to the chin, scaled to `face_width`."""
    face = max(face_models().detect(np.asarray(image)), key=lambda f: f.width)
    left, top, right, bottom = face.box
    pad = face.width // 2
    head = image.crop((max(0, left - pad), max(0, top - pad), right + pad, bottom + face.width // 8))
    return head.resize((face_width * 2, round(head.height * face_width * 2 / head.width)))


def _colour(name: str) -> tuple[int, int, int]:
    hue = {"red": 0, "orange": 30, "yellow": 57, "green": 120, "cyan": 180, "blue": 225, "purple": 270, "pink": 320}
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue[name] / 360, 0.8, 0.85))


def composite(head: Image.Image, background: str, clothing: str, gradient: bool = False, shift: int = 0) -> Image.Image:
    """A real head over a plain (or graded) background, over a plain-coloured top: a studio portrait."""
    canvas = Image.new("RGB", (600, 720), _colour(background))
    if gradient:  # the same colour, darker toward the bottom
        shade = np.linspace(1.0, 0.75, canvas.height)[:, None, None]
        canvas = Image.fromarray((np.asarray(canvas) * shade).astype(np.uint8))
    left, top = (canvas.width - head.width) // 2 + shift, 90 + shift
    body = Image.new("RGB", (round(head.width * 1.2), canvas.height), _colour(clothing))
    canvas.paste(body, ((canvas.width - body.width) // 2 + shift, top + head.height - 10))
    canvas.paste(head, (left, top))
    grain = np.random.default_rng(abs(shift)).normal(0, 4, (canvas.height, canvas.width, 3))  # a camera's noise
    return Image.fromarray(np.clip(np.asarray(canvas) + grain, 0, 255).astype(np.uint8))


VARIED = [  # (photo, mirrored, background, clothing, gradient)
    ("obama-1", False, "blue", "red", False),
    ("obama-2", False, "green", "yellow", True),
    ("obama-3", False, "orange", "blue", False),
    ("obama-2", True, "purple", "green", False),
    ("obama-3", True, "cyan", "pink", True),
    ("obama-1", True, "yellow", "purple", False),
]


def _ingested(root, name: str, photos: dict[str, Image.Image]) -> tuple[SubjectLayout, list[dict]]:
    folder = root / f"{name}-photos"
    folder.mkdir()
    for source, image in photos.items():
        image.save(folder / source)
    layout = SubjectLayout(root / name, "obama")
    rows = ingest(folder, layout, IngestSettings(near_duplicate_distance=0), show_progress=False).rows
    return layout, orient_subject(layout, rows, CheckSettings(), show_progress=False).rows


@pytest.fixture(scope="module")
def varied_set(tmp_path_factory, portraits):
    """Six real faces turned both ways, each on its own background colour and in its own clothes."""
    photos = {}
    for i, (name, mirror, background, clothing, gradient) in enumerate(VARIED):
        head = _head(ImageOps.mirror(portraits[name]) if mirror else portraits[name], 140)
        photos[f"varied-{i}.png"] = composite(head, background, clothing, gradient)
    return _ingested(tmp_path_factory.mktemp("variety"), "varied", photos)


@pytest.fixture(scope="module")
def uniform_set(tmp_path_factory, portraits):
    """Six framings of one real photo, all on one blue backdrop, all in one red top."""
    heads = crops(portraits["obama-1"], 6, seed=7)
    photos = {
        f"uniform-{i}.png": composite(_head(head, 110 + 10 * i), "blue", "red", shift=12 * i - 30)
        for i, head in enumerate(heads)
    }
    return _ingested(tmp_path_factory.mktemp("variety"), "uniform", photos)


def _advice(notes: list[str]) -> dict[str, str]:
    kinds = {"background": " background: ", "clothing": " clothing: ", "turn": "look the same way"}
    return {kind: note for note in notes for kind, words in kinds.items() if words in note}


def test_a_uniform_set_is_told_what_to_shoot(uniform_set):
    layout, rows = uniform_set
    result = crop_subject(layout, rows, CheckSettings(), show_progress=False)
    advice = _advice(result.notes)
    assert advice["background"] == (
        "6 of 6 photos have a blue background: the recipe asks for different backgrounds; "
        "take some photos in other places"
    )
    assert advice["clothing"] == (
        "6 of 6 photos show red clothing: the recipe asks for different cloth colors; add photos in other clothes"
    )
    assert "faces looking to different sides" in advice["turn"]
    frame = read_manifest(layout.manifest)
    assert set(frame["background_color"]) == {"blue"} and set(frame["clothing_color"]) == {"red"}
    assert frame["yaw"].max() - frame["yaw"].min() < 15
    assert not frame["flags"].str.contains("variety").any(), "advice on the set, never a flag on a photo"


def test_a_varied_set_gets_no_advice_and_its_numbers_are_in_the_manifest(varied_set):
    layout, rows = varied_set
    result = crop_subject(layout, rows, CheckSettings(), show_progress=False)
    assert _advice(result.notes) == {}, result.notes
    frame = read_manifest(layout.manifest).set_index("source")
    for i, (_, _, background, clothing, _) in enumerate(VARIED):
        row = frame.loc[f"varied-{i}.png"]
        assert (row["background_color"], row["clothing_color"]) == (background, clothing)
        assert colour_name(tuple(int(row["background_rgb"][k : k + 2], 16) for k in (1, 3, 5))) == background
    assert frame["yaw"].min() < -15 and frame["yaw"].max() > 15  # Obama turned both ways
    # The mirrored copies turn the other way, as far (the same face, seen in a mirror).
    for original, mirrored in ((1, 3), (2, 4), (0, 5)):
        turns = frame.loc[f"varied-{original}.png", "yaw"], frame.loc[f"varied-{mirrored}.png", "yaw"]
        assert turns[0] * turns[1] < 0 and abs(turns[0] + turns[1]) < 4, turns


def test_the_thresholds_are_settings(uniform_set):
    layout, rows = uniform_set

    def advice(**settings) -> set[str]:
        return set(_advice(crop_subject(layout, rows, CheckSettings(**settings), show_progress=False).notes))

    assert advice() == {"background", "clothing", "turn"}
    assert advice(variety_share=1.0) == {"turn"}  # "more than all of them" never happens
    assert advice(min_yaw_spread=0) == {"background", "clothing"}


def test_the_reject_policy_leaves_no_photo_out_for_variety(uniform_set):
    layout, rows = uniform_set
    result = crop_subject(layout, rows, CheckSettings(quality_policy="reject"), min_images=1, show_progress=False)
    assert all(row["flags"] == "" for row in result.rows), "clean photos, however alike"
    assert result.rejected == 0 and result.kept == 6 and len(_advice(result.notes)) == 3


def test_an_object_is_advised_on_its_backgrounds_only(uniform_set):
    layout, rows = uniform_set
    result = crop_subject(layout, rows, CheckSettings(), SubjectType.object, show_progress=False)
    assert set(_advice(result.notes)) == {"background"}
    frame = read_manifest(layout.manifest)
    assert frame["yaw"].isna().all() and (frame["clothing_color"] == "").all()
    assert set(frame["background_color"]) == {"blue"}


def test_the_crop_artifact_shows_the_numbers_and_the_advice(uniform_set, monkeypatch):
    layout, rows = uniform_set
    result = crop_subject(layout, rows, CheckSettings(), show_progress=False)
    published = {}
    monkeypatch.setattr(tasks.artifacts, "create_table_artifact", lambda **kw: published.update(table=kw["table"]))
    monkeypatch.setattr(tasks.artifacts, "create_markdown_artifact", lambda **kw: published.update(page=kw["markdown"]))
    tasks.artifacts.publish_checks(layout, "crop", result.rows, result.notes)
    frame = read_manifest(layout.manifest).set_index("source")
    assert len(published["table"]) == 6
    for row in published["table"]:
        assert row["background_color"] == "blue" and row["clothing_color"] == "red"
        assert row["yaw"] == pytest.approx(frame.loc[row["source"], "yaw"])
        assert row["background_rgb"] == frame.loc[row["source"], "background_rgb"]
    assert "6 of 6 photos have a blue background" in published["page"]
