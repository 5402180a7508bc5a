"""`manifest.csv`: what ingest did with every input file, one row each.

Later stages read the accepted rows; a pandera schema guards the contract
(columns, statuses, and that a reason is given exactly when a file was not
accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import pandera.pandas as pa

from lora_core.fs import atomic_output

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "STATUSES",
    "AcceptedImage",
    "accepted_images",
    "read_manifest",
    "write_manifest",
]

STATUSES = ("accepted", "rejected", "ignored")

MANIFEST_COLUMNS = [
    "source",  # path relative to the input folder or zip
    "status",  # accepted | rejected | ignored
    "reason",  # why not accepted; empty when accepted
    "image",  # written image, relative to <workdir>/<token>/; empty when not accepted
    "width",  # of the written image
    "height",
    "sha256",  # of the source bytes; empty when the file was never read
    "source_width",
    "source_height",
    "source_format",
    "source_mode",
    "resized",  # downscaled to the long-side limit
    "exif_rotated",  # EXIF orientation applied
    "duplicate_of",  # the kept source this one duplicates
    "user_caption",  # text of a caption file that came with the image
]

_INT_COLUMNS = ["width", "height", "source_width", "source_height"]
_BOOL_COLUMNS = ["resized", "exif_rotated"]


def _safe_relative(path: str) -> bool:
    if path == "":
        return True
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "source": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "status": pa.Column(str, pa.Check.isin(STATUSES)),
        "reason": pa.Column(str),
        "image": pa.Column(str, pa.Check(lambda s: s.map(_safe_relative), element_wise=False)),
        "width": pa.Column("Int64", pa.Check.ge(1), nullable=True),
        "height": pa.Column("Int64", pa.Check.ge(1), nullable=True),
        "sha256": pa.Column(str, pa.Check.str_matches(r"^([0-9a-f]{64})?$")),
        "source_width": pa.Column("Int64", pa.Check.ge(1), nullable=True),
        "source_height": pa.Column("Int64", pa.Check.ge(1), nullable=True),
        "source_format": pa.Column(str),
        "source_mode": pa.Column(str),
        "resized": pa.Column(bool),
        "exif_rotated": pa.Column(bool),
        "duplicate_of": pa.Column(str),
        "user_caption": pa.Column(str),
    },
    checks=[
        pa.Check(
            lambda df: (df["status"] == "accepted") == (df["reason"] == ""),
            error="a reason is required exactly when a file is not accepted",
        ),
        pa.Check(
            lambda df: (df["status"] == "accepted") == (df["image"] != ""),
            error="an image path is required exactly when a file is accepted",
        ),
        pa.Check(
            lambda df: ~df.loc[df["status"] == "accepted", "image"].duplicated().reindex(df.index, fill_value=False),
            error="two accepted rows share an image path",
        ),
        pa.Check(
            lambda df: (df["status"] != "accepted") | (df["width"].notna() & df["height"].notna()),
            error="accepted rows need width and height",
        ),
    ],
    strict=True,
    ordered=True,
    coerce=True,
)


def write_manifest(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Validate `rows` against the schema and write them as CSV, atomically."""
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for column in MANIFEST_COLUMNS:
        if column in _INT_COLUMNS:
            frame[column] = frame[column].astype("Int64")
        elif column in _BOOL_COLUMNS:
            values = frame[column].astype(object)
            frame[column] = values.where(values.notna(), False).astype(bool)
        else:
            values = frame[column].astype(object)
            frame[column] = values.where(values.notna(), "").astype(str)
    frame = MANIFEST_SCHEMA.validate(frame)
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def read_manifest(path: Path) -> pd.DataFrame:
    """Read and validate a manifest written by `write_manifest`."""
    frame = pd.read_csv(
        path,
        dtype={c: "Int64" for c in _INT_COLUMNS}
        | {c: str for c in MANIFEST_COLUMNS if c not in _INT_COLUMNS + _BOOL_COLUMNS},
        keep_default_na=False,
        na_values={c: [""] for c in _INT_COLUMNS},
    )
    return MANIFEST_SCHEMA.validate(frame)


@dataclass(frozen=True)
class AcceptedImage:
    """A training image as later stages see it: where it is, its size, the caption it came with."""

    image: str  # relative to <workdir>/<token>/
    width: int
    height: int
    user_caption: str


def accepted_images(path: Path) -> list[AcceptedImage]:
    """The accepted rows of the manifest at `path`, in image order."""
    frame = read_manifest(path)
    frame = frame[frame["status"] == "accepted"].sort_values("image")
    return [
        AcceptedImage(str(r.image), int(r.width), int(r.height), str(r.user_caption))
        for r in frame.itertuples(index=False)
    ]
