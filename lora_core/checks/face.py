"""Face checks: portraits with the subject's face clear and whole, and only the subject (people only).

The face is dlib's largest detection (`lora_core.checks.face_models`). Another face at
least a quarter the size of it is someone else in the frame; a face farther
than dlib's same-person bound from the set's median face is likely the wrong
person in the folder.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from lora_core.checks.base import MIN_RELATIVE, Check, Column, Finding, Photo, Sample

__all__ = [
    "FACE_CUT",
    "NO_FACE",
    "OTHER_FACES",
    "OTHER_PERSON",
    "SMALL_FACE",
    "FaceSettings",
    "framing",
    "identity_distances",
]


class FaceSettings(BaseModel):
    """Thresholds of the face checks."""

    min_face_px: int = Field(96, ge=16, description="Flag a face smaller than this (its width in pixels).")
    other_face_ratio: float = Field(
        0.25, gt=0, le=1, description="A second face at least this fraction of the main face's width is another person."
    )
    identity_distance: float = Field(
        0.6, gt=0, description="Flag a face farther than this from the set's median face (dlib's same-person bound)."
    )


def framing(face_share: float) -> str:
    """Portrait, half body or full body, from the face's height over the image's."""
    if face_share >= 0.18:
        return "portrait"
    return "half body" if face_share >= 0.07 else "full body"


def identity_distances(descriptors: np.ndarray) -> np.ndarray:
    """Each face descriptor's distance to the set's median face (element-wise median: robust to outliers)."""
    return np.linalg.norm(descriptors - np.median(descriptors, axis=0), axis=1)


# A face at all


def _measure_faces(sample: Sample) -> dict:
    measure = {"size": list(sample.image.size), "faces": len(sample.faces or [])}
    if sample.main is not None:
        measure["box"] = list(sample.main.box)
    return measure


def _judge_faces(photo: Photo, settings: FaceSettings) -> Finding:
    measure = photo.measure
    if "box" not in measure:
        return Finding({"faces": measure["faces"]}, "no face found, at any rotation")
    _, top, _, bottom = measure["box"]
    share = round((bottom - top) / measure["size"][1], 4)
    return Finding({"faces": measure["faces"], "face_share": share, "framing": framing(share)})


NO_FACE = Check(
    code="no_face",
    stage="crop",
    scope="photo",
    measures="faces found; the largest one's height over the image's (framing)",
    columns=(
        Column("faces", "int", "faces found", minimum=0),
        Column("face_share", "float", "face height over image height", in_table=False),
        Column("framing", "str", "portrait | half body | full body", values=("portrait", "half body", "full body")),
    ),
    measure=_measure_faces,
    judge=_judge_faces,
    summary="have no face found",
    settings=FaceSettings,
    needs_face=True,
)


# Someone else in the frame


def _measure_others(sample: Sample) -> dict:
    main = sample.main
    if main is None:
        return {}
    others = [f for f in sample.faces if f is not main and f.width >= 0.1 * main.width]
    return {"other_widths": [round(f.width / main.width, 3) for f in others]}


def _judge_others(photo: Photo, settings: FaceSettings) -> Finding:
    others = [w for w in photo.measure.get("other_widths", []) if w >= settings.other_face_ratio]
    note = f"{len(others)} other face(s) in the frame: someone else is in the photo" if others else None
    return Finding({}, note)


OTHER_FACES = Check(
    code="other_faces",
    stage="crop",
    scope="photo",
    measures="other faces at least `other_face_ratio` of the main face's width",
    columns=(),
    measure=_measure_others,
    judge=_judge_others,
    summary="show someone else too",
    settings=FaceSettings,
    needs_face=True,
)


# The face cut by the border


def _measure_cut(sample: Sample) -> dict:
    return {} if sample.main is None else {"cut": sample.main.cut_sides(sample.image.size)}


def _judge_cut(photo: Photo, settings: FaceSettings) -> Finding:
    cut = photo.measure.get("cut")
    return Finding({}, f"the face is cut by the {' and '.join(cut)} border" if cut else None)


FACE_CUT = Check(
    code="face_cut",
    stage="crop",
    scope="photo",
    measures="image borders that cut through the face box",
    columns=(),
    measure=_measure_cut,
    judge=_judge_cut,
    summary="have the face cut by the border",
    settings=FaceSettings,
    needs_face=True,
)


# A face too small to learn from


def _judge_size(photo: Photo, settings: FaceSettings) -> Finding:
    if "box" not in photo.measure:
        return Finding()
    left, _, right, _ = photo.measure["box"]
    small = right - left < settings.min_face_px
    return Finding({}, f"the face is only {right - left} px wide (under {settings.min_face_px})" if small else None)


SMALL_FACE = Check(
    code="small_face",
    stage="crop",
    scope="photo",
    measures="the face box's width in pixels",
    columns=(),
    judge=_judge_size,
    summary="have a face too small to learn from",
    settings=FaceSettings,
    needs_face=True,
)


# Another person


def _measure_descriptor(sample: Sample) -> dict:
    if sample.main is None:
        return {}
    descriptor = sample.models.descriptor(sample.models.chip(sample.rgb, sample.main))
    return {"descriptor": [round(float(v), 6) for v in descriptor]}


def _set_distances(measures: list[dict], settings: FaceSettings) -> list[float | None]:
    """Each face's distance to the set's median face; None without a face or with too few faces to compare."""
    with_face = [i for i, m in enumerate(measures) if m.get("descriptor")]
    if len(with_face) < MIN_RELATIVE:
        return [None] * len(measures)
    distances = identity_distances(np.array([measures[i]["descriptor"] for i in with_face]))
    by_photo = dict(zip(with_face, distances, strict=True))
    return [by_photo.get(i) for i in range(len(measures))]


def _judge_identity(photo: Photo, settings: FaceSettings) -> Finding:
    distance = photo.relation
    if distance is None or "box" not in photo.measure:
        return Finding()
    note = None
    if distance > settings.identity_distance:
        note = (
            f"the face differs from the set's (distance {distance:.2f}, over "
            f"{settings.identity_distance}): is this the same person?"
        )
    return Finding({"identity_distance": round(float(distance), 4)}, note)


OTHER_PERSON = Check(
    code="other_person",
    stage="crop",
    scope="set",
    measures="the face descriptor's distance to the set's median face",
    columns=(Column("identity_distance", "float", "face descriptor distance to the set's median face"),),
    measure=_measure_descriptor,
    relate=_set_distances,
    judge=_judge_identity,
    summary="may show another person",
    settings=FaceSettings,
    needs_face=True,
)
