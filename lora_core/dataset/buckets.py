"""Aspect-ratio buckets: the bucket set kohya sd-scripts makes, so images keep their framing.

The bucket set (sd-scripts `model_util.make_bucket_resolutions`): every bucket
holds at most resolution² pixels; sides are multiples of `step` between
`min_reso` and `max_reso`; the square bucket is always there, and each bucket's
transpose too.

Assignment (sd-scripts `BucketManager.select_bucket`): an image whose size is a
bucket goes there; any other goes to the bucket whose aspect ratio is nearest
its own (ties: the first in sorted order). It is resized to cover the bucket
and center-cropped, so a batch, which never mixes buckets, has one shape.

`bucket_no_upscale` differs from sd-scripts on purpose. sd-scripts then makes a
bucket per image size, which with 10-30 photos of varied sizes leaves most
buckets with one image and most batches short. We keep the shared bucket set,
and only an image too small to cover its bucket gets a bucket of its own: its
size rounded down to `step` (and, as sd-scripts does, shrunk to the area
first), so no image is ever enlarged.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from PIL import Image
from pydantic import BaseModel

from lora_core.dataset.manifest import accepted_images
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS
from lora_core.foundation.fs import atomic_output, ensure_inside
from lora_core.foundation.layout import SubjectLayout

__all__ = [
    "BUCKETS_COLUMNS",
    "BucketAssignment",
    "BucketPlan",
    "BucketResult",
    "apply_bucket",
    "bucket_counts",
    "bucket_resolutions",
    "bucket_subject",
    "buckets_intact",
    "nearest_bucket",
    "read_buckets",
    "short_buckets",
    "write_buckets",
]


def bucket_resolutions(
    resolution: int, min_reso: int = 256, max_reso: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """Sorted `(width, height)` buckets for a square training `resolution`.

    `max_reso` defaults to twice the resolution (1024 for SD1.5 at 512, 2048 for
    SDXL at 1024, the recipe's range).
    """
    max_reso = max_reso if max_reso is not None else 2 * resolution
    if step < 1 or min_reso % step or max_reso % step:
        raise ValueError(f"min_reso {min_reso} and max_reso {max_reso} must be multiples of step {step}")
    if not min_reso <= resolution <= max_reso:
        raise ValueError(f"resolution {resolution} must lie between min_reso {min_reso} and max_reso {max_reso}")
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        # The tallest multiple of `step` that keeps width x height within the area.
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket `size` itself if it is one, else the one with the nearest aspect ratio.

    Ties go to the first in sorted order, as numpy's argmin does in sd-scripts.
    """
    if tuple(size) in buckets:
        return (int(size[0]), int(size[1]))
    aspect = size[0] / size[1]
    return min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - aspect))


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes and how it is cut to fit: one row of `buckets.csv`.

    The crop box is in the coordinates of the image resized by `scale`
    (`resized_width` x `resized_height`), the convention of SDXL's crop
    conditioning.
    """

    image: str
    original_width: int
    original_height: int
    bucket_width: int
    bucket_height: int
    scale: float
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int
    crop_right: int
    crop_bottom: int

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.bucket_width, self.bucket_height)

    @property
    def upscaled(self) -> bool:
        return self.scale > 1.0


@dataclass(frozen=True)
class BucketPlan:
    """The bucket settings of a run (kohya's names) and the assignment rule."""

    resolution: int = 512
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = True
    enabled: bool = True

    def __post_init__(self) -> None:
        bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)  # validates

    @classmethod
    def from_config(cls, config) -> BucketPlan:
        """The plan a `LoraConfig` describes (enable_bucket, min/max_bucket_reso, ...)."""
        return cls(
            resolution=config.resolution,
            min_reso=config.min_bucket_reso,
            max_reso=config.max_bucket_reso,
            step=config.bucket_reso_steps,
            no_upscale=config.bucket_no_upscale,
            enabled=config.enable_bucket,
        )

    @property
    def buckets(self) -> list[tuple[int, int]]:
        if not self.enabled:
            return [(self.resolution, self.resolution)]
        return bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)

    def assign(self, image: str, size: tuple[int, int]) -> BucketAssignment:
        """Choose the bucket for an image of `size` and the resize and crop that fill it."""
        width, height = int(size[0]), int(size[1])
        if width < 1 or height < 1:
            raise ValueError(f"{image}: image size {width}x{height} is empty")
        bucket = nearest_bucket((width, height), self.buckets)
        # Without bucketing there is one shape, whatever it costs; with it, never enlarge if asked.
        if self.enabled and self.no_upscale and _cover_scale((width, height), bucket) > 1.0:
            bucket = self._own_bucket(width, height)
        return _fit(image, (width, height), bucket)

    def _own_bucket(self, width: int, height: int) -> tuple[int, int]:
        """A bucket for an image too small for the shared set: its own size, rounded down to `step`.

        As in sd-scripts' no-upscale mode, a side may fall below `min_reso` when
        the image itself is that small: never enlarging wins over the minimum.
        """
        area = self.resolution * self.resolution
        if width * height > area:  # shrink to the area first, keeping the aspect ratio
            factor = math.sqrt(area / (width * height))
            width, height = int(width * factor), int(height * factor)

        def side(value: int) -> int:
            return min(self.max_reso, max(self.step, value // self.step * self.step))

        return (side(width), side(height))


def _cover_scale(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The scale at which `size` just covers `bucket` (sd-scripts matches the side that binds)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def _fit(image: str, size: tuple[int, int], bucket: tuple[int, int]) -> BucketAssignment:
    scale = _cover_scale(size, bucket)
    # Round half up as sd-scripts does, never below the bucket (float error).
    resized = (max(bucket[0], int(size[0] * scale + 0.5)), max(bucket[1], int(size[1] * scale + 0.5)))
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return BucketAssignment(
        image=image,
        original_width=size[0],
        original_height=size[1],
        bucket_width=bucket[0],
        bucket_height=bucket[1],
        scale=round(scale, 6),
        resized_width=resized[0],
        resized_height=resized[1],
        crop_left=left,
        crop_top=top,
        crop_right=left + bucket[0],
        crop_bottom=top + bucket[1],
    )


def apply_bucket(image: Image.Image, assignment: BucketAssignment) -> Image.Image:
    """Resize `image` (Lanczos; PIL widens the filter when shrinking, so it averages like area) and crop it."""
    if image.size != (assignment.original_width, assignment.original_height):
        raise ValueError(
            f"{assignment.image}: image is {image.size[0]}x{image.size[1]}, buckets.csv says "
            f"{assignment.original_width}x{assignment.original_height}; re-run the buckets stage"
        )
    resized = image.resize((assignment.resized_width, assignment.resized_height), Image.Resampling.LANCZOS)
    return resized.crop((assignment.crop_left, assignment.crop_top, assignment.crop_right, assignment.crop_bottom))


def bucket_counts(assignments: list[BucketAssignment]) -> dict[tuple[int, int], int]:
    """Images per bucket, largest bucket first."""
    return dict(Counter(a.bucket for a in assignments).most_common())


def short_buckets(assignments: list[BucketAssignment], batch_size: int) -> dict[tuple[int, int], int]:
    """Buckets holding fewer images than a batch: their batches run short (batches never mix buckets)."""
    return {bucket: n for bucket, n in bucket_counts(assignments).items() if n < batch_size}


# --- buckets.csv ------------------------------------------------------------

BUCKETS_COLUMNS = [field for field in BucketAssignment.__dataclass_fields__]

_POSITIVE = pa.Check.ge(1)
BUCKETS_SCHEMA = pa.DataFrameSchema(
    {
        "image": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        **{name: pa.Column(int, _POSITIVE) for name in BUCKETS_COLUMNS[1:5]},
        "scale": pa.Column(float, pa.Check.gt(0)),
        **{name: pa.Column(int, _POSITIVE) for name in ("resized_width", "resized_height")},
        **{name: pa.Column(int, pa.Check.ge(0)) for name in BUCKETS_COLUMNS[8:]},
    },
    checks=[
        pa.Check(lambda df: df["crop_right"] - df["crop_left"] == df["bucket_width"], error="crop width != bucket"),
        pa.Check(lambda df: df["crop_bottom"] - df["crop_top"] == df["bucket_height"], error="crop height != bucket"),
        pa.Check(lambda df: df["crop_right"] <= df["resized_width"], error="crop leaves the resized image"),
        pa.Check(lambda df: df["crop_bottom"] <= df["resized_height"], error="crop leaves the resized image"),
    ],
    strict=True,
    ordered=True,
    coerce=True,
)


def write_buckets(path: Path, assignments: list[BucketAssignment]) -> None:
    """Validate and write `buckets.csv` atomically."""
    frame = pd.DataFrame([asdict(a) for a in assignments], columns=BUCKETS_COLUMNS)
    frame = BUCKETS_SCHEMA.validate(frame)
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_buckets(path: Path) -> list[BucketAssignment]:
    """Read and validate `buckets.csv`."""
    frame = BUCKETS_SCHEMA.validate(pd.read_csv(path, dtype={"image": str}, keep_default_na=False))
    return [BucketAssignment(**row) for row in frame.to_dict(orient="records")]


# --- The stage ------------------------------------------------------------------


def _label(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


class BucketResult(BaseModel):
    """What the buckets stage wrote; counts are keyed "WIDTHxHEIGHT"."""

    buckets_csv: Path
    counts: dict[str, int]
    short: dict[str, int]  # buckets with fewer images than a batch
    own_buckets: int  # images too small for the shared set (bucket_no_upscale)
    upscaled: int
    rows: list[dict]


def bucket_subject(layout: SubjectLayout, plan: BucketPlan, batch_size: int) -> BucketResult:
    """Assign every accepted image of `layout`'s manifest to a bucket; write `buckets.csv`.

    Sizes are read from the images themselves (headers only), so a stale
    manifest cannot put an image in the wrong bucket.
    """
    assignments = []
    for item in accepted_images(layout.manifest):
        path = ensure_inside(layout.root, layout.root / item.image)
        with Image.open(path) as image:
            assignments.append(plan.assign(item.image, image.size))
    write_buckets(layout.buckets_csv, assignments)
    shared = set(plan.buckets)
    return BucketResult(
        buckets_csv=layout.buckets_csv,
        counts={_label(b): n for b, n in bucket_counts(assignments).items()},
        short={_label(b): n for b, n in short_buckets(assignments, batch_size).items()},
        own_buckets=sum(a.bucket not in shared for a in assignments),
        upscaled=sum(a.upscaled for a in assignments),
        rows=[asdict(a) for a in assignments],
    )


def buckets_intact(layout: SubjectLayout, plan: BucketPlan) -> bool:
    """True when `buckets.csv` holds exactly what `plan` makes of the accepted images now.

    Checked against the current settings, not only the image list, so going
    back to earlier settings never leaves the other settings' rows in place.
    """
    try:
        rows = read_buckets(layout.buckets_csv)
        images = accepted_images(layout.manifest)
    except DAMAGED_FILE_ERRORS:
        return False
    return rows == [plan.assign(i.image, (i.width, i.height)) for i in images]
