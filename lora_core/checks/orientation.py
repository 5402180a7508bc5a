"""Orientation checks: sideways photos and mirrored selfies, which the recipe asks users to fix by hand.

They run in the `checks` stage, on ingest's images as decoded: its runner
(`lora_core.dataset.orient`) finds each photo's rotation and the antisymmetric
part of its face descriptor, and applies the policy; these records judge.

Mirroring is a sign-synchronisation problem. Correlating every pair of
photos' antisymmetry vectors gives a matrix whose leading eigenvector holds
one orientation per photo that agrees best with all the others; no reference
photo is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, Field

from lora_core.checks.base import Check, Column, Finding, Photo

__all__ = [
    "MIRRORED",
    "ROTATED",
    "SIDEWAYS",
    "MirrorPolicy",
    "MirrorVerdict",
    "OrientationSettings",
    "mirror_consensus",
]

_MIN_MIRROR_VOTES = 0.6  # share of the other faces that must agree a photo is mirrored
_MIN_SCORE = 0.05  # and the mean disagreement must be at least this (cosine), not noise around 0


class MirrorPolicy(StrEnum):
    """What to do with a photo that looks mirrored relative to the rest of the set."""

    flag = "flag"  # report it, keep it as it is
    fix = "fix"  # flip it back
    reject = "reject"  # leave it out of training


class OrientationSettings(BaseModel):
    """What the orientation checks fix, and when the mirroring consensus is trusted."""

    fix_rotation: bool = Field(
        True, description="Turn sideways or upside-down photos upright (found by face detection; people only)."
    )
    mirror_policy: MirrorPolicy = Field(
        MirrorPolicy.flag, description="Photos that look mirrored: flag (report, keep), fix (flip back) or reject."
    )
    min_mirror_faces: int = Field(
        4, ge=3, description="Fewest faces for the mirroring consensus; with fewer it is reported unavailable."
    )


# Rotation: the measure is the rotation (0/90/180/270) at which the face is found best.


def _judge_rotation(photo: Photo, settings: OrientationSettings) -> Finding:
    rotation = photo.measure["rotation"] if settings.fix_rotation else 0
    note = f"turned {rotation}° to stand upright (face found only that way)" if rotation else None
    return Finding({"rotation": rotation, "rotation_score": photo.measure["rotation_score"]}, note)


ROTATED = Check(
    code="rotated",
    stage="checks",
    scope="photo",
    measures="the rotation at which the face detector finds the face, and its score there",
    columns=(
        Column(
            "rotation",
            "int",
            "degrees (counter-clockwise) the photo was turned to stand upright",
            values=(0, 90, 180, 270),
        ),
        Column("rotation_score", "float", "face detector's confidence at that rotation", in_table=False),
    ),
    judge=_judge_rotation,
    summary="turned upright",
    settings=OrientationSettings,
    needs_face=True,
    policy=False,
)


def _judge_sideways(photo: Photo, settings: OrientationSettings) -> Finding:
    rotation = photo.measure["rotation"]
    if settings.fix_rotation or not rotation:
        return Finding()
    return Finding({}, f"stands upright only turned {rotation}°; left as it is (fix_rotation is off)")


SIDEWAYS = Check(
    code="sideways",
    stage="checks",
    scope="photo",
    measures="a rotation found while fix_rotation is off",
    columns=(),
    judge=_judge_sideways,
    settings=OrientationSettings,
    needs_face=True,
    policy=False,
)


# Mirroring


@dataclass(frozen=True)
class MirrorVerdict:
    """One photo's place in the set's orientation consensus."""

    score: float  # mean agreement with the others' consensus orientation; < 0: mirrored
    confidence: float  # share of the others whose own evidence agrees with the verdict
    mirrored: bool


def mirror_consensus(vectors: np.ndarray) -> list[MirrorVerdict]:
    """Which rows of `vectors` (one antisymmetric vector per photo) are mirrored relative to the majority.

    Sign synchronisation: the leading eigenvector of the correlation matrix
    gives every photo the orientation that agrees best with all the others;
    the orientation most photos share is taken as the true one.
    """
    count = len(vectors)
    if count < 3:
        raise ValueError("the mirroring consensus needs at least 3 faces")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    corr = unit @ unit.T
    np.fill_diagonal(corr, 0.0)
    signs = np.sign(np.linalg.eigh(corr)[1][:, -1])
    signs[signs == 0] = 1
    if (signs > 0).sum() < (signs < 0).sum() or ((signs > 0).sum() == (signs < 0).sum() and signs[0] < 0):
        signs = -signs  # the majority's orientation is "not mirrored"
    evidence = corr * signs[None, :]  # what each other photo says about this one, as it is
    verdicts = []
    for i in range(count):
        others = np.delete(evidence[i], i)
        score = float(others.mean())
        mirrored = score < 0
        agree = float(np.mean(others < 0) if mirrored else np.mean(others > 0))
        verdicts.append(MirrorVerdict(score, agree, mirrored and agree >= _MIN_MIRROR_VOTES and score <= -_MIN_SCORE))
    return verdicts


def _consensus(measures: list[dict], settings: OrientationSettings) -> list[MirrorVerdict | None]:
    """Each face's verdict; None for a photo without a face, or for all when there are too few faces."""
    with_face = [i for i, m in enumerate(measures) if m["antisymmetry"] is not None]
    if len(with_face) < settings.min_mirror_faces:
        return [None] * len(measures)
    vectors = np.array([measures[i]["antisymmetry"] for i in with_face], dtype=np.float64)
    by_photo = dict(zip(with_face, mirror_consensus(vectors), strict=True))
    return [by_photo.get(i) for i in range(len(measures))]


def _judge_mirror(photo: Photo, settings: OrientationSettings) -> Finding:
    verdict = photo.relation
    if verdict is None:
        return Finding()
    values = {"mirror_score": round(verdict.score, 4), "mirror_confidence": round(verdict.confidence, 3)}
    if not verdict.mirrored:
        return Finding(values)
    note = (
        f"looks mirrored: {verdict.confidence:.0%} of the other photos disagree with its orientation "
        f"(score {verdict.score:+.3f})"
    )
    return Finding(values, note)


MIRRORED = Check(
    code="mirrored",
    stage="checks",
    scope="set",
    measures="agreement of the face's mirror-antisymmetric descriptor with the set's consensus orientation",
    columns=(
        Column("mirror_score", "float", "agreement with the set's orientation: below 0 looks mirrored"),
        Column("mirror_confidence", "float", "share of the other faces that agree with that verdict"),
    ),
    relate=_consensus,
    judge=_judge_mirror,
    summary="look mirrored ({action})",
    settings=OrientationSettings,
    needs_face=True,
)
