"""Ingest: a messy folder or zip of photos in, the recipe's training layout out.

The recipe's author renames, converts to PNG and makes the folder structure by
hand. We do the same, and refuse what would hurt training, with a reason per
file: unreadable, not an image, too small (never upscaled), duplicates and
near-duplicates, decompression bombs, and anything that points outside the
input. One bad file never stops the run; too few good ones does, clearly.
Listing the input safely and pairing captions is `lora_core.foundation.sources`' job,
decoding one photo `lora_core.dataset.decoding`'s; this module decodes the photos on
every core, de-duplicates them and writes the layout.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import imagehash
from pydantic import BaseModel
from rich.progress import Progress

from lora_core.checks.workers import OnPhoto, run_per_photo
from lora_core.config.settings import IngestSettings
from lora_core.dataset.decoding import RejectedImage, decode_image
from lora_core.dataset.ingest_swap import clear_leftovers, link_or_copy, settle, swap_in
from lora_core.dataset.manifest import read_manifest
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS, UserError
from lora_core.foundation.fs import atomic_write_text, content_stamp, sha256_bytes, stamp_matches
from lora_core.foundation.layout import SubjectLayout, repeats_for
from lora_core.foundation.sources import Entry, InputError, fingerprint_input, open_input, pair_captions, read_caption

__all__ = ["IngestResult", "InputError", "TooFewImagesError", "ingest", "ingest_stamp", "layout_intact"]


class TooFewImagesError(UserError, ValueError):
    """Fewer usable photos than the minimum; carries every row so nothing is lost."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


class IngestResult(BaseModel):
    """What ingest wrote; later stages start from `manifest` and `class_dir`."""

    token: str
    subject_dir: Path
    class_dir: Path
    manifest: Path
    repeats: int
    accepted: int
    rejected: int
    ignored: int
    warnings: list[str]
    rows: list[dict]


@dataclass
class _Candidate:
    rel: str
    sha256: str
    pixels_sha256: str
    phash: imagehash.ImageHash
    staged: Path
    source_size: tuple[int, int]
    nbytes: int
    row: dict = field(default_factory=dict)


def _row(rel: str, status: str, reason: str = "", **values: object) -> dict:
    return {"source": rel, "status": status, "reason": reason, **values}


def _read(entry: Entry, settings: IngestSettings) -> bytes | str:
    """One file's bytes, or why it is refused unread."""
    assert entry.read is not None
    try:
        data = entry.read(settings.max_file_bytes)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    if not data:
        return "empty file"
    if len(data) > settings.max_file_bytes:
        return f"file larger than {settings.max_file_bytes} bytes"
    return data


@dataclass
class _Decoded:
    """One photo decoded and staged as PNG (in a worker): what de-duplication and the manifest need."""

    values: dict  # its manifest columns: sizes, format, mode, resized, exif_rotated
    pixels_sha256: str
    phash: imagehash.ImageHash
    source_size: tuple[int, int]


def _decode_to_png(job: tuple[bytes, Path], settings: IngestSettings) -> _Decoded | str:
    """Decode one file's bytes and stage it as PNG; or why it is rejected. Runs on a worker thread."""
    data, staged = job
    try:
        decoded = decode_image(data, settings)
    except RejectedImage as err:
        return str(err)
    image = decoded.image
    image.save(staged, format="PNG", compress_level=4)
    values = {
        "width": image.width,
        "height": image.height,
        "source_width": decoded.source_size[0],
        "source_height": decoded.source_size[1],
        "source_format": decoded.source_format,
        "source_mode": decoded.source_mode,
        "resized": decoded.resized,
        "exif_rotated": decoded.exif_rotated,
    }
    pixels = sha256_bytes(f"{image.size}".encode() + image.tobytes())
    return _Decoded(values, pixels, imagehash.phash(image), decoded.source_size)


class _Examination:
    """Every photo of the input read here in path order, decoded on the workers, each reported when done.

    Reading and hashing in order decides exact duplicates as one process
    would: the first file (by path) of equal bytes is the photo, its later
    copies are never decoded.
    """

    def __init__(self, images: list[Entry], settings: IngestSettings, staging: Path, report: Callable[[str], None]):
        self.images, self.settings, self.staging, self.report = images, settings, staging, report
        self.rows: list[dict] = []
        self.candidates: list[_Candidate] = []
        self._first_of: dict[str, str] = {}  # sha256 -> the first file with those bytes
        self._decoding: list[tuple[Entry, str, int, Path]] = []  # (entry, sha256, size, staged PNG) by job

    def jobs(self) -> Iterator[tuple[bytes, Path]]:
        """The files to decode, read one by one as the workers take them; the others get their row here."""
        for index, entry in enumerate(self.images):
            data = _read(entry, self.settings)
            if isinstance(data, str):
                self.rows.append(_row(entry.rel, "rejected", data))
                self.report(entry.rel)
                continue
            sha = sha256_bytes(data)
            if (first := self._first_of.setdefault(sha, entry.rel)) != entry.rel:
                self.rows.append(
                    _row(entry.rel, "rejected", f"exact duplicate of {first}", sha256=sha, duplicate_of=first)
                )
                self.report(entry.rel)
                continue
            staged = self.staging / f"{index:06d}.png"
            self._decoding.append((entry, sha, len(data), staged))
            yield data, staged

    def take(self, job: int, outcome: _Decoded | str) -> None:
        """A worker's result for job number `job`: a candidate, or a rejected row."""
        entry, sha, size, staged = self._decoding[job]
        if isinstance(outcome, str):
            self.rows.append(_row(entry.rel, "rejected", outcome, sha256=sha))
        else:
            row = _row(entry.rel, "accepted", sha256=sha, **outcome.values)
            self.candidates.append(
                _Candidate(entry.rel, sha, outcome.pixels_sha256, outcome.phash, staged, outcome.source_size, size, row)
            )
        self.report(entry.rel)


def _deduplicate(candidates: list[_Candidate], max_distance: int) -> list[_Candidate]:
    """Keep one photo of each group of same-pixel or near-identical photos: the best.

    Greedy over candidates from most to fewest source pixels, then largest
    file (least compressed), so a resized or re-encoded copy loses to its
    original whatever the file names.
    """
    kept: list[_Candidate] = []
    for cand in sorted(candidates, key=lambda c: (-c.source_size[0] * c.source_size[1], -c.nbytes, c.rel)):
        same = next((k for k in kept if k.pixels_sha256 == cand.pixels_sha256), None)
        if same is not None:
            cand.row.update(status="rejected", reason=f"same pixels as {same.rel}", duplicate_of=same.rel)
            continue
        near = min(kept, key=lambda k: k.phash - cand.phash, default=None)
        if near is not None and near.phash - cand.phash <= max_distance:
            cand.row.update(
                status="rejected",
                reason=f"near-duplicate of {near.rel} (perceptual hash distance {near.phash - cand.phash})",
                duplicate_of=near.rel,
            )
            continue
        kept.append(cand)
    return sorted(kept, key=lambda c: c.rel)


def _clear_for_rejected(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] != "accepted":
            for key in ("width", "height", "source_width", "source_height"):
                row.pop(key, None)
            row.update(resized=False, exif_rotated=False)


def _carry_sidecars(layout: SubjectLayout, new_dir: Path, new_name_by_sha: dict[str, str]) -> None:
    """Link or copy files beside old images (captions, cached latents) to the same photo's new name.

    Adding one photo renumbers the others; without this, an edited caption
    would end up beside another photo or be lost. Never a move: until the
    swap (`lora_core.dataset.ingest_swap`) the live folder keeps every file, so a kill
    or an error before it loses nothing. The manifest pairs old numbers with
    photos; the swap keeps it describing the folder on disk.
    """
    if not layout.manifest.exists():
        return
    try:
        old = read_manifest(layout.manifest)
    except DAMAGED_FILE_ERRORS:
        return
    for _, row in old[old["status"] == "accepted"].iterrows():
        new_name = new_name_by_sha.get(row["sha256"])
        old_image = layout.root / row["image"]
        if new_name is None or not old_image.parent.is_dir():
            continue
        for sidecar in old_image.parent.glob(f"{old_image.stem}.*"):
            if sidecar.name != old_image.name and sidecar.is_file() and not sidecar.is_symlink():
                link_or_copy(sidecar, new_dir / f"{Path(new_name).stem}{sidecar.name[len(old_image.stem) :]}")


def _install(layout: SubjectLayout, kept: list[_Candidate], repeats: int, staging_root: Path, rows: list[dict]) -> None:
    """Number the kept images in source order and swap them in as the class folder, with `rows` as manifest."""
    new_dir = staging_root / f"{repeats}_{layout.token}"
    new_dir.mkdir()
    new_name_by_sha = {}
    for number, cand in enumerate(kept, start=1):
        name = f"{number:04d}.png"
        cand.staged.rename(new_dir / name)
        cand.row["image"] = f"training_images/{new_dir.name}/{name}"
        new_name_by_sha[cand.sha256] = name
    _carry_sidecars(layout, new_dir, new_name_by_sha)
    swap_in(layout, staging_root, new_dir, rows)


def ingest(
    photos: Path,
    layout: SubjectLayout,
    settings: IngestSettings | None = None,
    *,
    num_repeats: int | None = None,
    show_progress: bool = True,
    on_photo: OnPhoto | None = None,
    workers: int | None = None,
) -> IngestResult:
    """Ingest `photos` (a folder, recursive, or a `.zip`) into `layout`.

    Photos are decoded on `workers` threads (default: every core this
    process may use; `lora_core.checks.workers`); the result is the same as
    one thread's. `on_photo(name, done, total)` is called here, in the
    caller's thread, as each photo is done.
    Returns what was written; raises `TooFewImagesError` (with every row)
    when fewer than `settings.min_images` photos are usable, and `InputError`
    when the input itself is missing or not a folder or zip.
    """
    settings = settings or IngestSettings()
    layout.create()
    clear_leftovers(layout)  # a killed run's staging: its swap finished or undone first
    staging_root = Path(tempfile.mkdtemp(prefix=".ingest-", dir=layout.training_images))
    staging = staging_root / "decoded"
    staging.mkdir()
    try:
        with open_input(photos, exclude=Path(layout.workdir)) as entries:
            rows, candidates = _examine_all(entries, settings, staging, show_progress, on_photo, workers)
        kept = _deduplicate(candidates, settings.near_duplicate_distance)
        rows += [c.row for c in candidates]
        rows.sort(key=lambda r: r["source"])
        _clear_for_rejected(rows)
        by_status = {s: sum(r["status"] == s for r in rows) for s in ("accepted", "rejected", "ignored")}
        if len(kept) < settings.min_images:
            raise TooFewImagesError(_too_few_message(photos, rows, settings.min_images), rows)
        repeats = repeats_for(len(kept), num_repeats)
        _install(layout, kept, repeats, staging_root, rows)  # writes the manifest too
        atomic_write_text(layout.ingest_stamp, ingest_stamp(photos, layout, settings, num_repeats))
    finally:
        settle(layout, staging_root)  # an error mid-swap: the swap finished or undone, then staging deleted

    notes = []
    if len(kept) > settings.warn_above_images:
        notes.append(
            f"{len(kept)} images accepted: more than {settings.warn_above_images} is, in the recipe's "
            "words, a waste of work; consider keeping the best 20-50"
        )
    return IngestResult(
        token=layout.token,
        subject_dir=layout.root,
        class_dir=layout.class_dir(repeats),
        manifest=layout.manifest,
        repeats=repeats,
        accepted=by_status["accepted"],
        rejected=by_status["rejected"],
        ignored=by_status["ignored"],
        warnings=notes,
        rows=rows,
    )


def _examine_all(
    entries: list[Entry],
    settings: IngestSettings,
    staging: Path,
    show_progress: bool,
    on_photo: OnPhoto | None = None,
    workers: int | None = None,
) -> tuple[list[dict], list[_Candidate]]:
    """Examine every file: images decoded on `workers` threads (default: every usable core).

    Threads, not processes: Pillow releases the GIL while it decodes, resizes
    and compresses the PNG, and `bench.ingest_speed` measured both at the same
    speed-up (1.7-2x on 2 cores); threads need no fork and work everywhere.
    """
    caption_of, image_of = pair_captions(entries)
    by_rel = {e.rel: e for e in entries}
    rows: list[dict] = []
    images: list[Entry] = []
    for entry in entries:
        if entry.verdict is not None:
            rows.append(_row(entry.rel, *entry.verdict))
        elif entry.rel in image_of:
            rows.append(_row(entry.rel, "ignored", f"caption file of {image_of[entry.rel]}"))
        else:
            images.append(entry)
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("ingest: decoding photos", total=len(images))
        done = itertools.count(1)

        def report(rel: str) -> None:
            progress.update(bar, advance=1, description=f"ingest: {rel}")
            if on_photo is not None:
                on_photo(rel, next(done), len(images))

        examination = _Examination(images, settings, staging, report)
        decode = partial(_decode_to_png, settings=settings)
        for job, outcome in run_per_photo(decode, examination.jobs(), workers, count=len(images), threads=True):
            examination.take(job, outcome)
    for candidate in examination.candidates:
        if candidate.rel in caption_of:
            candidate.row["user_caption"] = read_caption(by_rel[caption_of[candidate.rel]])
    return rows + examination.rows, examination.candidates


def _too_few_message(photos: Path, rows: list[dict], minimum: int) -> str:
    accepted = sum(r["status"] == "accepted" for r in rows)
    lines = [f"only {accepted} usable photo(s) in {photos}; at least {minimum} are needed (the recipe's minimum)."]
    problems = [r for r in rows if r["status"] != "accepted"]
    if problems:
        lines.append("Files not used:")
        lines += [f"  {r['source']}: {r['status']}: {r['reason']}" for r in problems]
    return "\n".join(lines)


def ingest_stamp(photos: Path, layout: SubjectLayout, settings: IngestSettings, num_repeats: int | None) -> str:
    """What an ingest is made from: the input's content, the rules and the repeats."""
    fingerprint = fingerprint_input(Path(photos), Path(layout.workdir))
    return content_stamp([fingerprint, settings.model_dump(mode="json"), num_repeats])


def layout_intact(layout: SubjectLayout, stamp: str | None = None) -> bool:
    """True when the manifest is valid, every accepted image is on disk and (given `stamp`) the
    layout was made from that input and settings.

    A cached ingest is only trusted when this holds; otherwise it is redone.
    """
    if not layout.manifest.is_file() or (stamp is not None and not stamp_matches(layout.ingest_stamp, stamp)):
        return False
    try:
        frame = read_manifest(layout.manifest)
    except DAMAGED_FILE_ERRORS:
        return False
    images = frame.loc[frame["status"] == "accepted", "image"]
    return all((layout.root / image).is_file() for image in images)
