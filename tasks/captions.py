"""The captioning stage as a Prefect task."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.config.settings import CaptionSettings
from lora_core.dataset.captioning import CaptionResult, caption_subject, captions_intact
from lora_core.dataset.crop import CropResult
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import publish_captions
from tasks.caching import CodeVersion
from tasks.stage import stage

CAPTIONS_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)


def _outputs_intact(
    dataset: CropResult,
    layout: SubjectLayout,
    settings: CaptionSettings,
    caption_extension: str,
    model_identity: str,
) -> bool:
    """Every accepted image has its caption, as written, for these settings (an edit re-runs, and is kept)."""
    return captions_intact(layout, caption_extension, settings)


@stage("captions", CAPTIONS_CACHE, outputs_intact=_outputs_intact, gpu=True)
def caption_images(
    dataset: CropResult,
    layout: SubjectLayout,
    settings: CaptionSettings,
    caption_extension: str,
    model_identity: str,
) -> CaptionResult:
    """Write a caption beside every training image (BLIP, or the user's own); captions.csv.

    `model_identity` is part of the cache key: a changed local model folder
    re-runs the stage even when its path is the same.
    """
    result = caption_subject(layout, settings, caption_extension=caption_extension)
    logger = get_run_logger()
    logger.info(
        "captions: %s; BLIP ran on %d image(s) (%s)",
        ", ".join(f"{n} {source}" for source, n in result.by_source.items()),
        result.generated,
        model_identity,
    )
    for record in result.records:
        if record["removed"]:
            logger.info("captions: %s: removed %s", record["image"], record["removed"])
    publish_captions(dataset.token, result, layout.root, caption_extension)
    return result
