"""The ingest stage as a Prefect task, and the per-photo progress bar the photo stages show."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.config.settings import IngestSettings
from lora_core.dataset.ingest import IngestResult, TooFewImagesError, ingest, ingest_stamp, layout_intact
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import artifact_key, ingest_summary, publish_ingest
from tasks.caching import CodeVersion, InputContent
from tasks.stage import stage

INGEST_CACHE = (
    TASK_SOURCE + INPUTS + InputContent(parameter="photos", exclude_parameter="layout") + CodeVersion.of_task(__name__)
)


class PhotoProgress:
    """A stage's progress artifact, photo by photo: "ingest: 37 of 212 photos (IMG_0042.HEIC)".

    Called as each photo is done (`on_photo` of ingest and the checks); the
    server is told at most every `interval` seconds, and always of the last.
    """

    def __init__(self, token: str, stage: str, interval: float = 0.5) -> None:
        self.stage, self.interval, self.last = stage, interval, 0.0
        self.artifact_id = create_progress_artifact(
            0.0, key=artifact_key(token, f"{stage}-progress"), description=f"{token}: {stage}, starting"
        )

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        words = f"{self.stage}: {done} of {total} photos ({name})"
        update_progress_artifact(self.artifact_id, progress=100.0 * done / max(1, total), description=words)


def _outputs_intact(
    photos: Path, layout: SubjectLayout, settings: IngestSettings, num_repeats: int | None = None
) -> bool:
    """The layout on disk was made from these photos and settings, and every accepted image is there."""
    return layout_intact(layout, ingest_stamp(Path(photos), layout, settings, num_repeats))


@stage("ingest", INGEST_CACHE, outputs_intact=_outputs_intact)
def ingest_photos(
    photos: Path, layout: SubjectLayout, settings: IngestSettings, num_repeats: int | None = None
) -> IngestResult:
    """Decode, check and copy the photos into the recipe's layout; write manifest.csv."""
    logger, token = get_run_logger(), layout.token
    try:
        progress = PhotoProgress(token, "ingest")
        result = ingest(photos, layout, settings, num_repeats=num_repeats, on_photo=progress)
    except TooFewImagesError as err:
        publish_ingest(token, err.rows, ingest_summary(token, err.rows, None, [], error=str(err)))
        raise
    for note in result.warnings:
        logger.warning(note)
    logger.info(
        "ingest: %d accepted, %d rejected, %d ignored; %d repeats -> %s",
        result.accepted,
        result.rejected,
        result.ignored,
        result.repeats,
        result.class_dir,
    )
    publish_ingest(token, result.rows, ingest_summary(token, result.rows, result.repeats, result.warnings))
    return result
