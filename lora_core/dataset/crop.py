"""Crop and quality: what the recipe's author checks photo by photo before training, as the `crop` stage.

"No low-res or pixelated images", "never upscale", portraits with the face
clear and whole, and only the subject; and, for the set, different
backgrounds, clothes and head turns. The checks themselves are records in
`lora_core.checks` (`face`, `image`, `variety`): each measure is a number with
a plain definition, recorded in the manifest, and a flag is raised against a
threshold (`CheckSettings`). This module runs them: it measures every image
once (cached by content), relates what is judged against the set (sharpness,
identity), judges, applies the quality policy, and sums up in plain words.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

import lora_core.checks
from lora_core.checks import Sample, apply_findings, measure_sample, policy_flags, relations, stage_checks, summaries
from lora_core.checks import face_models as faces_module
from lora_core.checks.face import framing, identity_distances
from lora_core.checks.face_models import FaceModels, face_models
from lora_core.checks.image import blockiness, high_frequency_share, pixelation, sharpness, upscale_signature
from lora_core.checks.image import grey as _grey  # noqa: F401  (the tests measure with it)
from lora_core.checks.workers import OnPhoto, analyse_photos
from lora_core.config.settings import CheckSettings, QualityPolicy, SubjectType
from lora_core.dataset.image_store import ImageStore
from lora_core.dataset.manifest import manifest_rows, write_manifest
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS
from lora_core.foundation.fs import JsonCache, atomic_write_text, content_stamp, source_version, stamp_matches
from lora_core.foundation.layout import SubjectLayout

__all__ = [
    "QUALITY_FLAGS",
    "CropResult",
    "blockiness",
    "count_guidance",
    "crop_intact",
    "crop_subject",
    "framing",
    "high_frequency_share",
    "identity_distances",
    "pixelation",
    "quality_stamp",
    "sharpness",
    "upscale_signature",
]

# Flags the quality policy acts on (orientation's own flags and the variety advice are not among them).
QUALITY_FLAGS = policy_flags("crop")
_CODE_VERSION = source_version(
    __file__, faces_module.__file__, *sorted(Path(lora_core.checks.__file__).parent.glob("*.py"))
)


def count_guidance(count: int) -> str:
    """The recipe's table of how many images to train on, for `count` images."""
    if count < 5:
        return f"{count} images: too few; the recipe's smallest set that works is 5-10"
    if count <= 10:
        return f"{count} images: enough (the recipe: 5-10 works)"
    if count <= 20:
        return f"{count} images: good (the recipe: 11-20 is good)"
    if count <= 50:
        return f"{count} images: the best range (the recipe: 21-50)"
    if count <= 100:
        return f"{count} images: many; the recipe uses 50-100 only for a mix of portraits and full body shots"
    return f"{count} images: more than 100 is a waste of work, in the recipe's words; keep the best 20-50"


class CropResult(BaseModel):
    """What the `crop` stage found; buckets and captions start from `rows`."""

    token: str
    kept: int
    flagged: int
    rejected: int
    framing: dict[str, int]
    guidance: str
    notes: list[str]
    rows: list[dict]


def crop_subject(
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
) -> CropResult:
    """Measure every training image, flag what the recipe warns against, apply the policy, update the manifest.

    Starts from the `checks` stage's `rows`. Per-image measures are cached by
    image content and run on `workers` processes (default: every usable core),
    `on_photo` told as each photo is done; what is judged against the set
    (sharpness, identity) is recomputed on every run. Rejection never leaves
    fewer than `min_images`. The variety advice is on the photos that are kept.
    """
    stamp = quality_stamp(rows, settings, subject_type, min_images)
    rows = [dict(row) for row in rows]
    store = ImageStore(layout)
    accepted = [row for row in rows if row["status"] == "accepted"]
    person = subject_type == SubjectType.person
    checks = stage_checks("crop", person)
    models = (models or face_models()) if person else None
    salt = json.dumps({"models": models.identity if models else subject_type.value, "code": _CODE_VERSION})
    for row in accepted:
        store.restore(row)  # a photo an earlier policy set aside comes back to be judged again
    measures = analyse_photos(
        partial(_measure, models=models, checks=checks),
        [(row["source"], layout.root / row["image"]) for row in accepted],
        JsonCache(layout.check_cache / "quality", salt),
        label="crop: quality checks",
        show_progress=show_progress,
        on_photo=on_photo,
        workers=workers,
    )

    related = relations(checks, measures, settings)
    for row, measure, mine in zip(accepted, measures, related, strict=True):
        apply_findings(row, checks, measure, mine, settings)
    flagged = [row for row in accepted if set(row["flags"].split(";")) & set(QUALITY_FLAGS)]
    notes = []
    if settings.quality_policy == QualityPolicy.reject and flagged:
        remaining = len(accepted) - len(flagged)
        if remaining < min_images:
            notes.append(
                f"{len(flagged)} flagged image(s) kept: leaving them out would leave {remaining}, "
                f"under the minimum of {min_images}"
            )
        else:
            for row in flagged:
                row["decision"] = "rejected"
                store.set_aside(row)
    write_manifest(layout.manifest, rows)
    atomic_write_text(layout.check_cache / "crop.stamp", stamp)

    kept = [row for row in rows if row["status"] == "accepted"]
    counts = {name: sum(row["framing"] == name for row in kept) for name in ("portrait", "half body", "full body")}
    advice = [note for check in checks if check.advise for note in check.advise(kept, settings)]
    return CropResult(
        token=layout.token,
        kept=len(kept),
        flagged=len(flagged),
        rejected=sum(row["decision"] == "rejected" for row in flagged),
        framing=counts if person else {},
        guidance=count_guidance(len(kept)),
        notes=notes + summaries(checks, flagged) + advice,
        rows=rows,
    )


def _measure(path: Path, models: FaceModels | None, checks: tuple) -> dict:
    """Every check's per-image measures of one training image (cached by its content by the caller)."""
    with Image.open(path) as picture:
        return measure_sample(checks, Sample(picture, models))


def quality_stamp(rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int) -> str:
    """What the `crop` stage's output is made from: the checks' rows, the settings, the code."""
    images = [(row["source"], row["status"], row.get("image", ""), row.get("checked_sha256", "")) for row in rows]
    return content_stamp([images, settings.model_dump(mode="json"), subject_type.value, min_images, _CODE_VERSION])


def crop_intact(
    layout: SubjectLayout, rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int = 5
) -> bool:
    """True when the crop stage ran on these `rows` with these settings and its measures are in the manifest."""
    if not stamp_matches(layout.check_cache / "crop.stamp", quality_stamp(rows, settings, subject_type, min_images)):
        return False
    try:
        rows = manifest_rows(layout.manifest)
    except DAMAGED_FILE_ERRORS:
        return False
    return all(row["sharpness"] is not None for row in rows if row["status"] == "accepted")
