"""The bucketing stage as a Prefect task."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_core.dataset.buckets import BucketPlan, BucketResult, bucket_subject, buckets_intact
from lora_core.dataset.crop import CropResult
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import publish_buckets
from tasks.caching import CodeVersion
from tasks.stage import stage

# The ingest result carries every image's hash, so new or changed photos re-run this.
BUCKETS_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)


def _outputs_intact(dataset: CropResult, layout: SubjectLayout, plan: BucketPlan, batch_size: int) -> bool:
    return buckets_intact(layout, plan)


@stage("buckets", BUCKETS_CACHE, outputs_intact=_outputs_intact)
def bucket_images(dataset: CropResult, layout: SubjectLayout, plan: BucketPlan, batch_size: int) -> BucketResult:
    """Assign each training image to an aspect-ratio bucket; write buckets.csv."""
    result = bucket_subject(layout, plan, batch_size)
    logger = get_run_logger()
    logger.info("buckets: %s", ", ".join(f"{b}: {n}" for b, n in result.counts.items()))
    if result.short:
        logger.warning(
            "buckets with fewer images than a batch of %d (their batches run short): %s",
            batch_size,
            ", ".join(result.short),
        )
    publish_buckets(dataset.token, result, batch_size)
    return result
