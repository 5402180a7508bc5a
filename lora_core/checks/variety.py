"""Variety: "Different backgrounds and cloth colors are a MUST. Faces looking to different sides too."

A set shot in one place, in one outfit, facing one way teaches the LoRA the
place, the outfit and the pose along with the person. Per photo this check
measures three things, with plain definitions:

- yaw: the head's turn, from dlib's 5 landmarks. The nose base's offset from
  the eyes' midpoint, along the line through the eyes and in eye distances, is
  `d * tan(yaw)` for a nose base `d` eye distances in front of the eyes
  (`_NOSE_DEPTH`, a typical face's); 0 faces the camera, positive turns toward
  the image's right. A mirrored photo has the opposite sign;
- background colour: the median colour of the frame's border strips (the top,
  and the sides down to the chin), where the subject rarely is;
- clothing colour: the median colour of a patch below the chin, as wide as the
  face; none when the photo ends at the chin.

Colours are named in coarse bins (`colour_name`), the words a user shoots by.

It judges the set only. The recipe says MUST, but dropping photos never makes a
set more varied, so variety is advice, never a flag on a photo or a rejection:
the crop stage's summary says what to shoot next, and the numbers are in the
manifest and the stage's table.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter

import numpy as np
from pydantic import BaseModel, Field

from lora_core.checks.base import MIN_RELATIVE, Check, Column, Finding, Photo, Sample

__all__ = ["COLOUR_NAMES", "VARIETY", "VarietySettings", "background_colour", "clothing_colour", "colour_name", "yaw"]

COLOUR_NAMES = ("black", "grey", "white", "brown", "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_NOSE_DEPTH = 0.3  # the nose base's depth in front of the eyes, in eye distances (a typical adult face)
_BORDER = 0.08  # the border strips' width, as a share of the image's shorter side
_HUES = (  # upper bound of each hue bin, in degrees
    (15, "red"),
    (45, "orange"),
    (70, "yellow"),
    (165, "green"),
    (195, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (345, "pink"),
    (361, "red"),
)


class VarietySettings(BaseModel):
    """When the set looks too uniform: the variety advice's thresholds."""

    variety_share: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Advise more variety when over this share of the photos has one background or clothing colour.",
    )
    min_yaw_spread: float = Field(
        15.0,
        ge=0,
        description="Advise faces turned to both sides when the faces' head turns span fewer degrees than this.",
    )


def colour_name(rgb: tuple[float, float, float]) -> str:
    """The coarse name of an RGB colour (0-255 per channel): one of COLOUR_NAMES."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(min(max(c, 0.0), 255.0) / 255 for c in rgb))
    if value < 0.2:
        return "black"
    if saturation < 0.2:
        return "white" if value > 0.8 else "grey"
    name = next(name for upper, name in _HUES if hue * 360 < upper)
    return "brown" if name == "orange" and value < 0.6 else name


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{round(float(c)):02x}" for c in rgb)


def _median(pixels: np.ndarray) -> np.ndarray:
    return np.median(pixels.reshape(-1, 3), axis=0)


def yaw(landmarks: tuple[tuple[float, float], ...]) -> float:
    """The head's turn in degrees from dlib's 5 landmarks: 0 facing the camera, positive toward the image's right."""
    points = np.asarray(landmarks, dtype=np.float64)
    eyes = sorted([points[0:2].mean(axis=0), points[2:4].mean(axis=0)], key=lambda p: p[0])
    axis = eyes[1] - eyes[0]
    offset = float(np.dot(points[4] - (eyes[0] + eyes[1]) / 2, axis) / max(np.dot(axis, axis), 1e-9))
    return math.degrees(math.atan(offset / _NOSE_DEPTH))


def background_colour(rgb: np.ndarray, chin: int | None) -> np.ndarray:
    """Median colour of the top strip and of the side strips down to `chin` (half the height without a face)."""
    height, width = rgb.shape[:2]
    strip = max(2, round(_BORDER * min(height, width)))
    bottom = max(strip + 1, min(height, chin if chin is not None else height // 2))
    strips = [rgb[:strip], rgb[strip:bottom, :strip], rgb[strip:bottom, -strip:]]
    return _median(np.concatenate([pixels.reshape(-1, 3) for pixels in strips]))


def clothing_colour(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """Median colour of a patch below the chin (face box): as wide as the face, one face tall; None if cut off."""
    height, width = rgb.shape[:2]
    left, top, right, bottom = box
    face = bottom - top
    centre, half = (left + right) / 2, 0.5 * (right - left)
    rows = slice(max(0, round(bottom + 0.3 * face)), min(height, round(bottom + 1.3 * face)))
    cols = slice(max(0, round(centre - half)), min(width, round(centre + half)))
    patch = rgb[rows, cols]
    if patch.shape[0] < 0.3 * face or patch.shape[1] < 2:
        return None
    return _median(patch)


def _measure(sample: Sample) -> dict:
    face = sample.main
    background = background_colour(sample.rgb, None if face is None else face.box[3])
    measure: dict = {"background_rgb": [round(float(c), 1) for c in background]}
    if face is not None:
        clothing = clothing_colour(sample.rgb, face.box)
        measure.update(
            yaw=round(yaw(face.landmarks), 1),
            clothing_rgb=None if clothing is None else [round(float(c), 1) for c in clothing],
        )
    return measure


def _judge(photo: Photo, settings: VarietySettings) -> Finding:
    """Only numbers: variety is judged on the set (`_advise`)."""
    measure = photo.measure
    values = {"yaw": measure.get("yaw"), "clothing_color": "", "clothing_rgb": ""}
    background = np.asarray(measure["background_rgb"])
    values.update(background_color=colour_name(tuple(background)), background_rgb=_hex(background))
    if measure.get("clothing_rgb") is not None:
        clothing = np.asarray(measure["clothing_rgb"])
        values.update(clothing_color=colour_name(tuple(clothing)), clothing_rgb=_hex(clothing))
    return Finding(values)


def _most_common(rows: list[dict], column: str) -> tuple[str, int, int] | None:
    """(name, photos with it, photos with any) of `column`'s commonest value; None with too few to judge."""
    names = [row[column] for row in rows if row.get(column)]
    if len(names) < MIN_RELATIVE:
        return None
    name, count = Counter(names).most_common(1)[0]
    return name, count, len(names)


def _advise(rows: list[dict], settings: VarietySettings) -> list[str]:
    """Plain-words advice when the kept photos share one background, one outfit, or one head turn."""
    notes = []
    wants = {
        "background_color": "have a {name} background: the recipe asks for different backgrounds; "
        "take some photos in other places",
        "clothing_color": "show {name} clothing: the recipe asks for different cloth colors; "
        "add photos in other clothes",
    }
    for column, words in wants.items():
        common = _most_common(rows, column)
        if common and common[1] / common[2] > settings.variety_share:
            name, count, total = common
            notes.append(f"{count} of {total} photos " + words.format(name=name))
    turns = [row["yaw"] for row in rows if row.get("yaw") is not None]
    if len(turns) >= MIN_RELATIVE and max(turns) - min(turns) < settings.min_yaw_spread:
        notes.append(
            f"the faces all look the same way (head turns from {min(turns):+.0f}° to {max(turns):+.0f}°, "
            f"under {settings.min_yaw_spread:.0f}° apart): the recipe asks for faces looking to different sides"
        )
    return notes


VARIETY = Check(
    code="variety",
    stage="crop",
    scope="set",
    measures="head turn, background colour and clothing colour; advice when the set shares one of them",
    columns=(
        Column("yaw", "float", "head turn in degrees from the 5 landmarks: 0 facing the camera, + toward image right"),
        Column("background_color", "str", "coarse name of the border strips' median colour", values=COLOUR_NAMES),
        Column("background_rgb", "str", "that colour as #rrggbb", pattern=r"^(#[0-9a-f]{6})?$"),
        Column("clothing_color", "str", "coarse name of the colour below the chin", values=COLOUR_NAMES),
        Column("clothing_rgb", "str", "that colour as #rrggbb", pattern=r"^(#[0-9a-f]{6})?$"),
    ),
    measure=_measure,
    judge=_judge,
    advise=_advise,
    settings=VarietySettings,
    policy=False,
)
