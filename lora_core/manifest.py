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
    "ALL_COLUMNS",
    "CHECK_COLUMNS",
    "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "ORIENTATION_COLUMNS",
    "QUALITY_COLUMNS",
    "STATUSES",
    "AcceptedImage",
    "accepted_images",
    "manifest_rows",
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

# Written by the dataset checks (stages `checks` and `crop`); empty until they run.
CHECK_COLUMNS = [
    "rotation",  # degrees (counter-clockwise) the photo was turned to stand upright
    "rotation_score",  # face detector's confidence at that rotation
    "mirror_score",  # agreement with the set's orientation: below 0 looks mirrored
    "mirror_confidence",  # share of the other faces that agree with that verdict
    "faces",  # faces found
    "face_share",  # face height over image height
    "framing",  # portrait | half body | full body
    "sharpness",  # variance of the Laplacian (face region for a person), set-relative
    "pixelation",  # share of edge energy on one block grid
    "blockiness",  # JPEG 8x8 grid edge strength over in-block edge strength
    "upscale",  # strength of the periodic pattern resampling leaves
    "identity_distance",  # face descriptor distance to the set's median face
    "flags",  # what the checks found, ';'-separated codes
    "decision",  # keep | fixed | rejected
    "check_notes",  # the flags in plain words
    "checked_sha256",  # of the training image as the checks left it
]
ORIENTATION_COLUMNS = ["rotation", "rotation_score", "mirror_score", "mirror_confidence"]
QUALITY_COLUMNS = [
    "faces",
    "face_share",
    "framing",
    "sharpness",
    "pixelation",
    "blockiness",
    "upscale",
    "identity_distance",
]
ALL_COLUMNS = MANIFEST_COLUMNS + CHECK_COLUMNS

_INT_COLUMNS = ["width", "height", "source_width", "source_height", "rotation", "faces"]
_FLOAT_COLUMNS = [
    "rotation_score",
    "mirror_score",
    "mirror_confidence",
    "face_share",
    "sharpness",
    "pixelation",
    "blockiness",
    "upscale",
    "identity_distance",
]
_BOOL_COLUMNS = ["resized", "exif_rotated"]


def _safe_relative(path: str) -> bool:
    if path == "":
        return True
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


_SCHEMA_COLUMNS = {
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
    "rotation": pa.Column("Int64", pa.Check.isin([0, 90, 180, 270]), nullable=True),
    "faces": pa.Column("Int64", pa.Check.ge(0), nullable=True),
    **{column: pa.Column(float, nullable=True) for column in _FLOAT_COLUMNS},
    "framing": pa.Column(str, pa.Check.isin(["", "portrait", "half body", "full body"])),
    "flags": pa.Column(str),
    "decision": pa.Column(str, pa.Check.isin(["", "keep", "fixed", "rejected"])),
    "check_notes": pa.Column(str),
    "checked_sha256": pa.Column(str, pa.Check.str_matches(r"^([0-9a-f]{64})?$")),
}

MANIFEST_SCHEMA = pa.DataFrameSchema(
    {column: _SCHEMA_COLUMNS[column] for column in ALL_COLUMNS},
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
    frame = pd.DataFrame(rows, columns=ALL_COLUMNS)
    for column in ALL_COLUMNS:
        if column in _INT_COLUMNS:
            frame[column] = frame[column].astype("Int64")
        elif column in _FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
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
    numeric = _INT_COLUMNS + _FLOAT_COLUMNS
    frame = pd.read_csv(
        path,
        dtype={c: "Int64" for c in _INT_COLUMNS}
        | {c: float for c in _FLOAT_COLUMNS}
        | {c: str for c in ALL_COLUMNS if c not in numeric + _BOOL_COLUMNS},
        keep_default_na=False,
        na_values={c: [""] for c in numeric},
    )
    for column in ALL_COLUMNS:  # a manifest written before the dataset checks existed
        if column not in frame:
            frame[column] = pd.NA if column in numeric else ""
    frame = frame.astype({c: "Int64" for c in _INT_COLUMNS} | {c: float for c in _FLOAT_COLUMNS})
    return MANIFEST_SCHEMA.validate(frame[ALL_COLUMNS])


def manifest_rows(path: Path) -> list[dict]:
    """The manifest as plain rows (missing numbers as None), for a stage to update and write back."""
    frame = read_manifest(path).astype(object)
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


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
