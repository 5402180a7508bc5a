"""The `crop` stage as a Prefect task: one whole, clear face of the subject per photo (`dataset.crop`)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.config.settings import CheckSettings, SubjectType
from lora_core.dataset.crop import CropResult, crop_intact, crop_subject
from lora_core.dataset.orient import OrientResult
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import publish_checks
from tasks.caching import CodeVersion
from tasks.ingest import PhotoProgress
from tasks.stage import stage

# Inputs carry every image's hash (the checks stage's rows): one new photo re-runs the stage; inside it,
# only that photo is analysed (per-image cache by content).
CROP_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)


def _crop_intact(
    checked: OrientResult,
    layout: SubjectLayout,
    settings: CheckSettings,
    subject_type: SubjectType,
    min_images: int,
) -> bool:
    return crop_intact(layout, checked.rows, settings, subject_type, min_images)


@stage("crop", CROP_CACHE, outputs_intact=_crop_intact)
def crop_images(
    checked: OrientResult,
    layout: SubjectLayout,
    settings: CheckSettings,
    subject_type: SubjectType,
    min_images: int,
) -> CropResult:
    """Check framing and image quality of every photo: faces, blur, pixelation, upscaling, identity."""
    progress = PhotoProgress(checked.token, "crop")
    result = crop_subject(layout, checked.rows, settings, subject_type, min_images=min_images, on_photo=progress)
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
