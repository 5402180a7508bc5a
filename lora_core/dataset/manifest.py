"""`manifest.csv`: what ingest did with every input file, one row each.

Later stages read the accepted rows; a pandera schema guards the contract
(columns, statuses, and that a reason is given exactly when a file was not
accepted).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import pandera.pandas as pa

from lora_core.checks import Column, stage_columns
from lora_core.foundation.fs import atomic_output

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

# Written by the dataset checks (stages `checks` and `crop`); empty until they run. Each check
# declares its own columns (`lora_core.checks`): name, type and meaning.
ORIENTATION_COLUMNS = [column.name for column in stage_columns("checks")]
QUALITY_COLUMNS = [column.name for column in stage_columns("crop")]  # every crop-stage check's, variety's too
CHECK_COLUMNS = [
    *ORIENTATION_COLUMNS,
    *QUALITY_COLUMNS,
    "flags",  # what the checks found, ';'-separated codes
    "decision",  # keep | fixed | rejected
    "check_notes",  # the flags in plain words
    "checked_sha256",  # of the training image as the checks left it
]
ALL_COLUMNS = MANIFEST_COLUMNS + CHECK_COLUMNS

_CHECK_VALUES = [column for stage in ("checks", "crop") for column in stage_columns(stage)]
_INT_COLUMNS = ["width", "height", "source_width", "source_height"] + [
    column.name for column in _CHECK_VALUES if column.dtype == "int"
]
_FLOAT_COLUMNS = [column.name for column in _CHECK_VALUES if column.dtype == "float"]
_BOOL_COLUMNS = ["resized", "exif_rotated"]


def _safe_relative(path: str) -> bool:
    if path == "":
        return True
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


def _schema_column(column: Column) -> pa.Column:
    """A check's column as the schema checks it: its type, and its allowed values or pattern when it has them."""
    checks = []
    if column.values:
        checks.append(pa.Check.isin(list(column.values) + ([] if column.dtype in ("int", "float") else [""])))
    if column.minimum is not None:
        checks.append(pa.Check.ge(column.minimum))
    if column.pattern is not None:
        checks.append(pa.Check.str_matches(column.pattern))
    if column.dtype == "str":
        return pa.Column(str, checks)
    return pa.Column("Int64" if column.dtype == "int" else float, checks, nullable=True)


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
    **{column.name: _schema_column(column) for column in _CHECK_VALUES},
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


# Validated manifests of this process, by file: the digest of its bytes and the frame. A cached re-run checks
# the manifest once per stage, and pandera's validation took 0.2 s each time (`bench.rerun`); hashing the
# bytes takes microseconds, and no edit, whatever its length or time stamp, goes unseen.
_VALIDATED: dict[Path, tuple[str, pd.DataFrame]] = {}


def read_manifest(path: Path) -> pd.DataFrame:
    """Read and validate a manifest written by `write_manifest` (validated once per content of the file)."""
    path = Path(path).absolute()
    data = path.read_bytes()
    version = hashlib.sha256(data).hexdigest()
    known = _VALIDATED.get(path)
    if known is None or known[0] != version:
        known = _VALIDATED[path] = (version, _read_manifest(io.BytesIO(data)))
    return known[1].copy()


def _read_manifest(path: Path | io.BytesIO) -> pd.DataFrame:
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
