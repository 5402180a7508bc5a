"""Orientation: sideways photos and mirrored selfies, which the recipe asks users to fix by hand.

"Please revise the orientation of your entire dataset!!" A mirrored selfie
flips the subject's asymmetric features (hair part, moles, scars); a set that
mixes both sides teaches an average face and training stalls.

Rotation: dlib's HOG detector finds upright faces only, so the rotation
(0/90/180/270) at which the face is found, with the best score, is the one that
makes the photo upright. Photos with EXIF orientation were turned by ingest.

Mirroring is a sign-synchronisation problem. For each face we take the
antisymmetric part of its identity descriptor, `d(face) - d(mirror(face))` on
the landmark-aligned chip: it changes sign exactly when the photo is mirrored,
and, because the descriptor is trained to ignore pose and light, what is left
is the person's own asymmetry. Correlating these vectors between every pair
of photos gives a matrix whose leading eigenvector holds one orientation per
photo that agrees best with all the others; no reference photo is needed.
(Pixel-level antisymmetry was tried first; head turn and side light swamp it.)
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

import lora_core.checks
from lora_core.checks import apply_findings, relations, stage_checks, summaries
from lora_core.checks import face_models as faces_module
from lora_core.checks.face_models import Face, FaceModels, face_models
from lora_core.checks.orientation import MirrorVerdict, mirror_consensus
from lora_core.checks.workers import OnPhoto, analyse_photos
from lora_core.config.settings import CheckSettings, MirrorPolicy, SubjectType
from lora_core.dataset.image_store import ImageStore
from lora_core.dataset.manifest import ORIENTATION_COLUMNS, QUALITY_COLUMNS, manifest_rows, write_manifest
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS
from lora_core.foundation.fs import (
    JsonCache,
    atomic_write_text,
    content_stamp,
    sha256_file,
    source_version,
    stamp_matches,
)
from lora_core.foundation.layout import SubjectLayout

__all__ = [
    "ROTATIONS",
    "MirrorVerdict",
    "OrientResult",
    "face_antisymmetry",
    "find_rotation",
    "mirror_consensus",
    "orient_intact",
    "orient_subject",
    "orientation_stamp",
    "turn",
]

ROTATIONS = (0, 90, 180, 270)  # counter-clockwise degrees
_CONFIDENT_SCORE = 0.5  # a face this clear at 0 degrees: no need to try other rotations
_ROTATION_MARGIN = 0.3  # another rotation must beat 0 degrees by this much
_CODE_VERSION = source_version(
    __file__, faces_module.__file__, *sorted(Path(lora_core.checks.__file__).parent.glob("*.py"))
)


def turn(image: Image.Image, rotation: int, mirror: bool = False) -> Image.Image:
    """`image` rotated `rotation` degrees counter-clockwise, then mirrored left-right if asked."""
    ops = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    if rotation in ops:
        image = image.transpose(ops[rotation])
    elif rotation != 0:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation}")
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image


def find_rotation(image: Image.Image, models: FaceModels) -> tuple[int, list[Face]]:
    """The rotation that makes the face upright, and the faces found at it.

    0 when no rotation shows a face (the photo is left as it is).
    """
    upright = models.detect(np.asarray(image))
    if upright and upright[0].score >= _CONFIDENT_SCORE:
        return 0, upright
    best = (upright[0].score + _ROTATION_MARGIN if upright else -np.inf, 0, upright)
    for rotation in ROTATIONS[1:]:
        faces = models.detect(np.asarray(turn(image, rotation)))
        if faces and faces[0].score > best[0]:
            best = (faces[0].score, rotation, faces)
    return best[1], best[2]


def face_antisymmetry(models: FaceModels, rgb: np.ndarray, face: Face) -> np.ndarray:
    """The part of the face's identity descriptor that changes sign when the photo is mirrored."""
    chip = models.chip(rgb, face)
    return models.descriptor(chip) - models.descriptor(chip[:, ::-1])


class OrientResult(BaseModel):
    """What the `checks` stage found and did; later stages start from `rows`."""

    token: str
    rotated: int
    mirrored: int
    fixed: int
    rejected: int
    mirror_consensus: bool  # False when too few faces to compare
    notes: list[str]
    rows: list[dict]


def orient_subject(
    layout: SubjectLayout,
    rows: list[dict],
    settings: CheckSettings,
    subject_type: SubjectType = SubjectType.person,
    *,
    min_images: int = 5,
    models: FaceModels | None = None,
    show_progress: bool = True,
    on_photo: OnPhoto | None = None,
    workers: int | None = None,
) -> OrientResult:
    """Find each photo's rotation and mirroring, apply the policy, and record it in the manifest.

    Starts from ingest's `rows` and its images as decoded (kept in the image
    store once a fix replaces them), so a changed policy is applied to the
    originals, never on top of an earlier fix. Per-image analysis is cached
    by content and runs on `workers` processes (default: every usable core;
    `lora_core.checks.workers`), `on_photo` told as each photo is done; the
    consensus is recomputed on every run. Rejection never leaves fewer than
    `min_images`.
    """
    stamp = orientation_stamp(rows, settings, subject_type, min_images)
    rows = [_fresh(row) for row in rows]
    accepted = [row for row in rows if row["status"] == "accepted"]
    store = ImageStore(layout)
    notes: list[str] = []
    if subject_type != SubjectType.person:
        for done, row in enumerate(accepted, start=1):
            store.write(row)  # the original: undoes fixes made while it was a person
            row["decision"] = "keep"
            if on_photo is not None:
                on_photo(row["source"], done, len(accepted))
        write_manifest(layout.manifest, rows)
        atomic_write_text(layout.check_cache / "checks.stamp", stamp)
        return OrientResult(
            token=layout.token,
            rotated=0,
            mirrored=0,
            fixed=0,
            rejected=0,
            mirror_consensus=False,
            notes=[f"orientation checks skipped: they need faces, and the subject type is {subject_type.value}"],
            rows=rows,
        )

    models = models or face_models()
    salt = json.dumps({"models": models.identity, "code": _CODE_VERSION})
    checks = stage_checks("checks")
    analyses = analyse_photos(
        partial(_analyse, models=models),
        [(row["source"], store.original(row)) for row in accepted],
        JsonCache(layout.check_cache / "orientation", salt),
        label="checks: orientation",
        show_progress=show_progress,
        on_photo=on_photo,
        workers=workers,
    )

    related = relations(checks, analyses, settings)
    with_face = sum(analysis["antisymmetry"] is not None for analysis in analyses)
    consensus = with_face >= settings.min_mirror_faces
    if not consensus:
        notes.append(
            f"mirroring not checked: {with_face} photo(s) with a face, the consensus needs {settings.min_mirror_faces}"
        )
    policy = settings.mirror_policy
    mirrored_count = sum(mine["mirrored"] is not None and mine["mirrored"].mirrored for mine in related)
    if policy == MirrorPolicy.reject and len(accepted) - mirrored_count < min_images:
        policy = MirrorPolicy.flag
        notes.append(
            f"{mirrored_count} mirrored image(s) kept: leaving them out would leave "
            f"{len(accepted) - mirrored_count}, under the minimum of {min_images}"
        )
    for row, analysis, mine in zip(accepted, analyses, related, strict=True):
        apply_findings(row, checks, analysis, mine, settings)
        _decide(row, policy)
        flip = _mirrored(row) and policy == MirrorPolicy.fix
        if row["decision"] == "rejected":
            store.set_aside(row)  # the original is kept, so a later policy can bring it back
        elif row["rotation"] or flip:
            store.write(row, _fixed(Image.open(store.original(row)), analysis["rotation"], row["rotation"], flip))
        else:
            store.write(row)  # the original, as ingest wrote it
    write_manifest(layout.manifest, rows)
    atomic_write_text(layout.check_cache / "checks.stamp", stamp)

    action = {"flag": "kept as they are", "fix": "flipped back", "reject": "left out"}[policy.value]
    return OrientResult(
        token=layout.token,
        rotated=sum(bool(row["rotation"]) for row in accepted),
        mirrored=sum(_mirrored(row) for row in accepted),
        fixed=sum(row["decision"] == "fixed" for row in accepted),
        rejected=sum(row["decision"] == "rejected" for row in accepted),
        mirror_consensus=consensus,
        notes=notes + summaries(checks, accepted, action=action),
        rows=rows,
    )


def _fixed(image: Image.Image, upright: int, applied: int, flip: bool) -> Image.Image:
    """`image` turned by `applied` degrees and, if `flip`, mirrored left-right as seen upright.

    The mirroring was judged on the upright face, so the flip happens in that
    frame even when the photo is left sideways (`applied` 0).
    """
    if not flip:
        return turn(image, applied)
    return turn(turn(image, upright, mirror=True), (applied - upright) % 360)


def orientation_stamp(rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int) -> str:
    """What the `checks` stage's output is made from: ingest's rows, the settings, the code."""
    images = [(row["source"], row["status"], row.get("sha256", ""), row.get("image", "")) for row in rows]
    return content_stamp([images, settings.model_dump(mode="json"), subject_type.value, min_images, _CODE_VERSION])


def _fresh(row: dict) -> dict:
    """A copy of ingest's row with every check column empty."""
    row = dict(row)
    for column in ORIENTATION_COLUMNS + QUALITY_COLUMNS:
        row[column] = None
    row.update(flags="", decision="", check_notes="", framing="", checked_sha256="")
    return row


def _mirrored(row: dict) -> bool:
    return "mirrored" in row["flags"].split(";")


def _decide(row: dict, policy: MirrorPolicy) -> None:
    """Keep, fix or reject a judged photo: turned upright is fixed; a mirrored one as the policy says."""
    decision = "fixed" if row["rotation"] else "keep"
    if _mirrored(row) and policy == MirrorPolicy.fix:
        decision = "fixed"
        row["check_notes"] += "; flipped back"
    elif _mirrored(row) and policy == MirrorPolicy.reject:
        decision = "rejected"
    row["decision"] = decision


def _analyse(path: Path, models: FaceModels) -> dict:
    """Rotation and face antisymmetry of one original image (cached by its content by the caller)."""
    with Image.open(path) as picture:
        image = picture.convert("RGB")
    rotation, faces = find_rotation(image, models)
    antisymmetry = None
    if faces:
        upright = np.asarray(turn(image, rotation))
        antisymmetry = [round(float(v), 6) for v in face_antisymmetry(models, upright, faces[0])]
    return {
        "rotation": rotation,
        "rotation_score": round(faces[0].score, 4) if faces else None,
        "antisymmetry": antisymmetry,
    }


def orient_intact(
    layout: SubjectLayout, rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int = 5
) -> bool:
    """True when the checks ran on these `rows` with these settings, and the training images are
    still the ones they wrote; a cached result is trusted only then."""
    if not stamp_matches(
        layout.check_cache / "checks.stamp", orientation_stamp(rows, settings, subject_type, min_images)
    ):
        return False
    try:
        rows = manifest_rows(layout.manifest)
    except DAMAGED_FILE_ERRORS:
        return False
    for row in rows:
        if row["status"] != "accepted":
            continue
        path = layout.root / row["image"]
        if not row["decision"] or not path.is_file() or sha256_file(path) != row["checked_sha256"]:
            return False
    return True
