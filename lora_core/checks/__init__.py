"""The dataset checks, one record each (`Check`), and the registry the stages, manifest and artifacts read.

A new check is one module here declaring its `Check` (code, what it
measures, how it judges, its summary words, its manifest columns, its
settings model), one line in `CHECKS`, its settings among `CheckSettings`'s
bases (`lora_core.config.settings`), and its test. Stages run their checks in
registry order, so a check may look at the flags raised before it.

Modules: `orientation` (stage `checks`: rotated, sideways, mirrored), `face`
and `image` (stage `crop`: the quality checks), `variety` (stage `crop`: the
set's backgrounds, clothing and head turns, as advice).
"""

from __future__ import annotations

from typing import Any, Literal

from lora_core.checks.base import Check, Column, Finding, Photo, QualityPolicy, Sample
from lora_core.checks.face import FACE_CUT, NO_FACE, OTHER_FACES, OTHER_PERSON, SMALL_FACE, FaceSettings
from lora_core.checks.image import BLURRED, JPEG_BLOCKY, PIXELATED, UPSCALED, ImageSettings
from lora_core.checks.orientation import MIRRORED, ROTATED, SIDEWAYS, MirrorPolicy, OrientationSettings
from lora_core.checks.variety import VARIETY, VarietySettings

__all__ = [
    "CHECKS",
    "Check",
    "Column",
    "FaceSettings",
    "Finding",
    "ImageSettings",
    "MirrorPolicy",
    "OrientationSettings",
    "Photo",
    "QualityPolicy",
    "Sample",
    "VarietySettings",
    "apply_findings",
    "measure_sample",
    "policy_flags",
    "relations",
    "stage_checks",
    "stage_columns",
    "summaries",
]

Stage = Literal["checks", "crop"]

# In the order they run: a photo's flags are listed in this order, and so are the manifest's columns.
CHECKS: tuple[Check, ...] = (
    ROTATED,
    SIDEWAYS,
    MIRRORED,
    NO_FACE,
    OTHER_FACES,
    FACE_CUT,
    SMALL_FACE,
    OTHER_PERSON,
    PIXELATED,
    JPEG_BLOCKY,
    UPSCALED,
    BLURRED,
    VARIETY,
)


def stage_checks(stage: Stage, person: bool = True) -> tuple[Check, ...]:
    """The checks `stage` runs, in order; those that need a face only for a person."""
    return tuple(check for check in CHECKS if check.stage == stage and (person or not check.needs_face))


def stage_columns(stage: Stage) -> list[Column]:
    """The manifest columns `stage`'s checks fill, in registry order."""
    return [column for check in stage_checks(stage) for column in check.columns]


def policy_flags(stage: Stage) -> tuple[str, ...]:
    """The flags of `stage` that its policy (quality_policy, mirror_policy) acts on."""
    return tuple(check.code for check in stage_checks(stage) if check.policy)


def measure_sample(checks: tuple[Check, ...], sample: Sample) -> dict:
    """Every check's per-image measures of one image, merged."""
    measure: dict = {}
    for check in checks:
        if check.measure is not None:
            measure.update(check.measure(sample))
    return measure


def relations(checks: tuple[Check, ...], measures: list[dict], settings: Any) -> list[dict[str, Any]]:
    """For each photo, what every set-level check made of it against the others (by check code)."""
    related: list[dict[str, Any]] = [{} for _ in measures]
    for check in checks:
        if check.relate is not None:
            for mine, value in zip(related, check.relate(measures, settings), strict=True):
                mine[check.code] = value
    return related


def apply_findings(row: dict, checks: tuple[Check, ...], measure: dict, related: dict, settings: Any) -> None:
    """Judge one photo with each check in turn: fill their columns, add their flags and plain-word notes."""
    flags = [flag for flag in row["flags"].split(";") if flag]
    notes = [note for note in row["check_notes"].split("; ") if note]
    for check in checks:
        finding = check.judge(Photo(row, measure, related.get(check.code), tuple(flags)), settings)
        row.update(finding.values)
        if finding.note:
            flags.append(check.code)
            notes.append(finding.note)
    row.update(flags=";".join(flags), check_notes="; ".join(notes))


def summaries(checks: tuple[Check, ...], rows: list[dict], **words: str) -> list[str]:
    """One line per check that flagged photos, naming them: what to look at first. `words` fill the summaries."""
    lines = []
    for check in checks:
        names = [row["source"] for row in rows if check.code in row["flags"].split(";")]
        if names and check.summary:
            lines.append(f"{len(names)} image(s) {check.summary.format(**words)}: {', '.join(names)}")
    return lines
