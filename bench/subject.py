"""A subject folder for the training benches: photos with their captions, ingested, bucketed, captioned."""

from __future__ import annotations

from pathlib import Path

from bench.photos import photo
from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import IngestSettings
from lora_core.dataset.blip import BlipCaptioner
from lora_core.dataset.buckets import BucketPlan, bucket_subject
from lora_core.dataset.captioning import caption_subject
from lora_core.dataset.ingest import ingest
from lora_core.foundation.layout import SubjectLayout

__all__ = ["make_subject"]


def make_subject(
    root: Path, config: LoraConfig, side: int, count: int, repeats: int, token: str = "b3nch"
) -> SubjectLayout:
    """`count` square photos of `side` px with their own captions, ingested, bucketed and captioned.

    An epoch is `count * repeats / batch` steps; the photos share one bucket.
    Photos smaller than the config's resolution get a bucket of their own size
    (`bucket_no_upscale`): that is how the CPU bench trains below the config's
    256 px floor. BLIP is never loaded: every photo brings its caption.
    """
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        photo((side, side), 70 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man in a suit, photo {i}")
    layout = SubjectLayout(root / "work", token)
    settings = IngestSettings(min_short_side=min(256, side), min_images=1, near_duplicate_distance=0)
    ingest(photos, layout, settings, num_repeats=repeats, show_progress=False)
    bucket_subject(layout, BucketPlan.from_config(config), config.train_batch_size)
    no_blip = "bench:no-blip"  # never loaded (all captions are the user's); names the captions' source
    caption_subject(
        layout,
        config.captioning.model_copy(update={"model": no_blip}),
        captioner=BlipCaptioner(no_blip),
        show_progress=False,
    )
    return layout
