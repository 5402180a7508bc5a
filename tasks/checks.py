"""The dataset-check stages as Prefect tasks: `checks` (orientation, mirroring) and `crop` (crop and quality)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.config.settings import CheckSettings, SubjectType
from lora_core.dataset.crop import QualityResult, check_quality, quality_intact
from lora_core.dataset.ingest import IngestResult
from lora_core.dataset.orient import OrientationResult, check_orientation, orientation_intact
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import publish_checks
from tasks.caching import CodeVersion
from tasks.ingest import PhotoProgress
from tasks.stage import stage

# Inputs carry every image's hash (ingest's rows), so one new photo re-runs the
# stage; inside it, only that photo is analysed (per-image cache by content).
CHECKS_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)


def _checks_intact(
    ingested: IngestResult, layout: SubjectLayout, settings: CheckSettings, subject_type: SubjectType, min_images: int
) -> bool:
    return orientation_intact(layout, ingested.rows, settings, subject_type, min_images)


@stage("checks", CHECKS_CACHE, outputs_intact=_checks_intact)
def check_images(
    ingested: IngestResult, layout: SubjectLayout, settings: CheckSettings, subject_type: SubjectType, min_images: int
) -> OrientationResult:
    """Turn sideways photos upright and find mirrored ones (flag, fix or reject, by policy)."""
    progress = PhotoProgress(ingested.token, "checks")
    result = check_orientation(layout, ingested.rows, settings, subject_type, min_images=min_images, on_photo=progress)
    logger = get_run_logger()
    logger.info("checks: %d turned upright, %d look mirrored", result.rotated, result.mirrored)
    for note in result.notes:
        logger.warning("checks: %s", note)
    publish_checks(layout, "checks", result.rows, result.notes)
    return result


def _crop_intact(
    checked: OrientationResult,
    layout: SubjectLayout,
    settings: CheckSettings,
    subject_type: SubjectType,
    min_images: int,
) -> bool:
    return quality_intact(layout, checked.rows, settings, subject_type, min_images)


@stage("crop", CHECKS_CACHE, outputs_intact=_crop_intact)
def crop_images(
    checked: OrientationResult,
    layout: SubjectLayout,
    settings: CheckSettings,
    subject_type: SubjectType,
    min_images: int,
) -> QualityResult:
    """Check framing and image quality of every photo: faces, blur, pixelation, upscaling, identity."""
    progress = PhotoProgress(checked.token, "crop")
    result = check_quality(layout, checked.rows, settings, subject_type, min_images=min_images, on_photo=progress)
    logger = get_run_logger()
    logger.info(
        "crop: %d kept, %d flagged, %d rejected; %s", result.kept, result.flagged, result.rejected, result.guidance
    )
    for note in result.notes:
        logger.warning("crop: %s", note)
    framing = ", ".join(f"{n} {name}" for name, n in result.framing.items())
    overview = [result.guidance] + ([f"framing: {framing}"] if framing else [])
    publish_checks(layout, "crop", result.rows, overview + result.notes)
    return result
