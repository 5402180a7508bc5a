"""Property tests: whatever bytes or images arrive, ingest never crashes and every file gets a row."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_core.config.settings import IngestSettings
from lora_core.dataset.ingest import TooFewImagesError, ingest
from lora_core.dataset.manifest import read_manifest
from lora_core.foundation.layout import SubjectLayout
from tests.conftest import encode, photo

FORMATS = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "RGBA", "L", "LA", "P", "1"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("RGB", "L", "P"),
    "TIFF": ("RGB", "CMYK", "L"),
    "GIF": ("P", "L"),
    "HEIF": ("RGB", "RGBA"),  # an iPhone's photos (pillow-heif)
    "AVIF": ("RGB", "RGBA"),
}
FAST = {"HEIF": {"enc_params": {"preset": "ultrafast"}}, "AVIF": {"speed": 10}}  # keep the encoders quick

valid_images = st.builds(
    lambda fmt, i, w, h, seed: (fmt, FORMATS[fmt][i % len(FORMATS[fmt])], (w, h), seed),
    st.sampled_from(sorted(FORMATS)),
    st.integers(0, 5),
    st.integers(256, 520),
    st.integers(256, 520),
    st.integers(0, 10_000),
)
names = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9_ .-]{0,12}", fullmatch=True)


def _ingest_rows(folder: Path, work: Path) -> list[dict]:
    try:
        return ingest(folder, SubjectLayout(work, "tok"), IngestSettings(min_images=1), show_progress=False).rows
    except TooFewImagesError as err:  # the only refusal allowed: nothing usable at all
        return err.rows


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, st.binary(max_size=2048), min_size=1, max_size=6))
def test_random_bytes_never_crash_and_every_file_gets_a_row(files):
    root = Path(tempfile.mkdtemp())
    try:
        folder = root / "in"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        rows = _ingest_rows(folder, root / "work")
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert {r["source"] for r in rows} == on_disk and len(rows) == len(on_disk)
        assert all(r["status"] in ("rejected", "ignored") and r["reason"] for r in rows)
    finally:
        shutil.rmtree(root)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_images, min_size=1, max_size=5, unique_by=lambda v: v[3]))
def test_random_valid_images_are_accepted_or_called_duplicates(images):
    root = Path(tempfile.mkdtemp())
    try:
        folder = root / "in"
        folder.mkdir()
        for i, (fmt, mode, size, seed) in enumerate(images):
            (folder / f"{i}.{fmt.lower()}").write_bytes(
                encode(photo(size, seed).convert(mode), fmt, **FAST.get(fmt, {}))
            )
        rows = _ingest_rows(folder, root / "work")
        assert len(rows) == len(images)
        for row in rows:
            assert row["status"] == "accepted" or "duplicate" in row["reason"] or "same pixels" in row["reason"], row
        if any(r["status"] == "accepted" for r in rows):
            manifest = read_manifest(root / "work" / "tok" / "manifest.csv")
            assert len(manifest) == len(images)
    finally:
        shutil.rmtree(root)
