"""The `checks` stage as a Prefect task: sideways photos turned upright, mirrored ones found (`dataset.orient`)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.config.settings import CheckSettings, SubjectType
from lora_core.dataset.ingest import IngestResult
from lora_core.dataset.orient import OrientResult, orient_intact, orient_subject
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
    return orient_intact(layout, ingested.rows, settings, subject_type, min_images)


@stage("checks", CHECKS_CACHE, outputs_intact=_checks_intact)
def check_images(
    ingested: IngestResult, layout: SubjectLayout, settings: CheckSettings, subject_type: SubjectType, min_images: int
) -> OrientResult:
    """Turn sideways photos upright and find mirrored ones (flag, fix or reject, by policy)."""
    progress = PhotoProgress(ingested.token, "checks")
    result = orient_subject(layout, ingested.rows, settings, subject_type, min_images=min_images, on_photo=progress)
    logger = get_run_logger()
    logger.info("checks: %d turned upright, %d look mirrored", result.rotated, result.mirrored)
    for note in result.notes:
        logger.warning("checks: %s", note)
    publish_checks(layout, "checks", result.rows, result.notes)
    return result
