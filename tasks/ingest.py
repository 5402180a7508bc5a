"""The ingest stage as a Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

import lora_core.decoding
import lora_core.ingest
import lora_core.manifest
import lora_core.sources
from lora_core.ingest import IngestResult, TooFewImagesError, ingest, ingest_stamp, layout_intact
from lora_core.layout import SubjectLayout
from lora_core.settings import IngestSettings
from tasks.artifacts import ingest_summary, publish_ingest
from tasks.caching import CodeVersion, InputContent
from tasks.stage import stage

INGEST_CACHE = (
    TASK_SOURCE
    + INPUTS
    + InputContent(parameter="photos", exclude_parameter="workdir")
    + CodeVersion(modules=(lora_core.ingest, lora_core.decoding, lora_core.sources, lora_core.manifest))
)


def _outputs_intact(
    photos: Path, token: str, workdir: Path, settings: IngestSettings, num_repeats: int | None = None
) -> bool:
    """The layout on disk was made from these photos and settings, and every accepted image is there."""
    layout = SubjectLayout(workdir, token)
    return layout_intact(layout, ingest_stamp(Path(photos), layout, settings, num_repeats))


@stage("ingest", INGEST_CACHE, outputs_intact=_outputs_intact)
def ingest_photos(
    photos: Path, token: str, workdir: Path, settings: IngestSettings, num_repeats: int | None = None
) -> IngestResult:
    """Decode, check and copy the photos into the seed's layout; write manifest.csv."""
    logger = get_run_logger()
    try:
        result = ingest(photos, SubjectLayout(workdir, token), settings, num_repeats=num_repeats)
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
