"""What a dataset check is: one record that says what it measures, how it judges, and what it writes.

A stage (`checks` or `crop`) runs its checks in registry order. For each
photo it gathers every check's measures (cached by the image's content), lets
each set-level check relate them to the rest of the set, then asks each check
for its `Finding`: the values of its manifest columns and, when it raises its
flag, the reason in plain words. A check that advises on the whole set returns
plain-words notes for the stage's summary instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal

import numpy as np
from PIL import Image

from lora_core.checks.face_models import Face, FaceModels

__all__ = ["MIN_RELATIVE", "Check", "Column", "Finding", "Photo", "QualityPolicy", "Sample"]

MEASURE_SIDE = 1024  # image measures look at most this many pixels along each axis, at the centre
MIN_RELATIVE = 3  # fewest photos to judge one against the rest of the set


class QualityPolicy(StrEnum):
    """What to do with a photo a quality check flags (faces, blur, pixelation, JPEG blocks, upscaling, identity)."""

    flag = "flag"
    reject = "reject"


@dataclass(frozen=True)
class Column:
    """One manifest column a check fills; empty (None or "") until its stage runs."""

    name: str
    dtype: Literal["int", "float", "str"]
    meaning: str
    values: tuple = ()  # the only values allowed besides empty; () allows any
    minimum: float | None = None
    pattern: str | None = None  # a regular expression text values match (empty included)
    in_table: bool = True  # shown in the stage's table artifact


@dataclass(frozen=True)
class Finding:
    """What a check found on one photo: its columns' values, and its reason in words when it raises its flag."""

    values: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


@dataclass(frozen=True)
class Photo:
    """One photo as a check judges it."""

    row: dict  # its manifest row as the stage found it
    measure: dict  # every check's measures of it, merged
    relation: Any  # what the check's `relate` made of it against the set; None without one
    flags: tuple[str, ...]  # flags raised on it so far, earlier checks first


class Sample:
    """One training image as the crop stage's measures see it: decoded once, its faces found once.

    `faces` is None when the subject is not a person (no face checks run).
    """

    def __init__(self, image: Image.Image, models: FaceModels | None) -> None:
        self.image = image.convert("RGB")
        self.models = models

    @cached_property
    def rgb(self) -> np.ndarray:
        return np.asarray(self.image)

    @cached_property
    def faces(self) -> list[Face] | None:
        return None if self.models is None else self.models.detect(self.rgb)

    @cached_property
    def main(self) -> Face | None:
        """The largest face: the subject."""
        return max(self.faces, key=lambda f: f.width) if self.faces else None

    @cached_property
    def centre(self) -> np.ndarray:
        """The grey image's centre, at most MEASURE_SIDE square: where the subject is."""
        grey = np.asarray(self.image.convert("L"), dtype=np.float64)
        top, left = (max(0, (side - MEASURE_SIDE) // 2) for side in grey.shape)
        return grey[top : top + MEASURE_SIDE, left : left + MEASURE_SIDE]


@dataclass(frozen=True)
class Check:
    """One dataset check, declared once: the stages, the manifest, the artifacts and the summaries read it.

    Args:
        code (`str`): its name, and the flag it raises on a photo (a set-level advisory raises none).
        stage (`"checks"` or `"crop"`): the pipeline stage it runs in.
        scope (`"photo"` or `"set"`): judged on the photo alone, or against the rest of the set.
        measures (`str`): what it measures, in one line.
        columns (`tuple[Column, ...]`): the manifest columns it fills.
        judge (`Callable[[Photo, settings], Finding]`): its verdict on one photo.
        measure (`Callable[[Sample], dict]`, *optional*): its per-image measures (crop stage; cached by content).
        relate (`Callable[[list[dict], settings], list]`, *optional*): each photo's standing in the set,
            from every photo's measures (recomputed on every run).
        advise (`Callable[[list[dict], settings], list[str]]`, *optional*): plain-words notes on the kept
            photos' rows as a whole.
        summary (`str`): how the photos it flagged are summarised: "{n} image(s) <summary>: <names>".
        settings (`type`, *optional*): the pydantic model of its thresholds; `CheckSettings` inherits it.
        needs_face (`bool`): runs only when the subject is a person.
        policy (`bool`): the stage's policy (quality_policy, mirror_policy) acts on its flag.
    """

    code: str
    stage: Literal["checks", "crop"]
    scope: Literal["photo", "set"]
    measures: str
    columns: tuple[Column, ...]
    judge: Callable[[Photo, Any], Finding]
    measure: Callable[[Sample], dict] | None = None
    relate: Callable[[list[dict], Any], list] | None = None
    advise: Callable[[list[dict], Any], list[str]] | None = None
    summary: str = ""
    settings: type | None = None
    needs_face: bool = False
    policy: bool = True
