"""Listing the files of an input folder or `.zip` without trusting them.

Nothing here decodes images; it decides which entries may be read at all,
and which caption file goes with which photo.
A symlink or zip member that points outside the input is never opened, a
zip entry with an absolute or `..` path is never extracted, and special
files (FIFOs, devices) are never read, so listing cannot hang or leak.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lora_core.foundation.errors import UserError

__all__ = [
    "CAPTION_SUFFIXES",
    "Entry",
    "InputError",
    "all_captioned",
    "fingerprint_input",
    "open_input",
    "pair_captions",
    "read_caption",
]

CAPTION_SUFFIXES = (".txt", ".caption")
MAX_CAPTION_BYTES = 16 * 1024  # a longer "caption" is not one
_SYSTEM_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "$recycle.bin"}
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class InputError(UserError, ValueError):
    """The input as a whole cannot be used (missing, not a folder or zip, bad zip)."""


@dataclass
class Entry:
    """One file of the input.

    `verdict` is set when the entry is decided without reading it
    (("ignored" | "rejected", reason)); otherwise `read` returns its bytes,
    at most `limit + 1` of them so an oversized file is caught without
    loading it whole.
    """

    rel: str
    read: Callable[[int], bytes] | None = None
    verdict: tuple[str, str] | None = None


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") or part.lower() in _SYSTEM_NAMES for part in PurePosixPath(rel).parts)


def _read_regular(path: Path) -> Callable[[int], bytes]:
    def read(limit: int) -> bytes:
        # O_NOFOLLOW: if the file was swapped for a symlink since listing, refuse.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OSError("not a regular file")
            return handle.read(limit + 1)

    return read


def _inside(root: Path, target: Path) -> bool:
    return target == root or root in target.parents


def _walk_folder(root: Path, exclude: Path | None) -> Iterator[Entry]:
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if exclude is not None and path.resolve() == exclude:
                dirnames.remove(name)  # the work folder: our own output, not input
            elif path.is_symlink():
                dirnames.remove(name)
                target = path.resolve()
                if _inside(root, target):
                    yield Entry(
                        rel, verdict=("ignored", "symlinked folder inside the input (read from its real place)")
                    )
                else:
                    yield Entry(rel, verdict=("rejected", "symlinked folder points outside the input (not followed)"))
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            yield _file_entry(root, path, rel)


def _file_entry(root: Path, path: Path, rel: str) -> Entry:
    if _is_hidden(rel):
        return Entry(rel, verdict=("ignored", "hidden or system file"))
    try:
        info = path.lstat()
    except OSError as err:
        return Entry(rel, verdict=("rejected", f"cannot read: {err.strerror}"))
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        if not _inside(root, target):
            return Entry(rel, verdict=("rejected", "symlink points outside the input (not read)"))
        if not target.is_file():
            return Entry(rel, verdict=("rejected", "broken symlink or link to a non-file"))
        return Entry(rel, read=_read_regular(target))
    if not stat.S_ISREG(info.st_mode):
        return Entry(rel, verdict=("rejected", "not a regular file (device, FIFO or socket)"))
    return Entry(rel, read=_read_regular(path))


def _unsafe_member(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or bool(_DRIVE_RE.match(name)) or ".." in parts


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[Entry]:
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        name = info.filename
        if info.is_dir():
            continue
        if _unsafe_member(name):
            yield Entry(name, verdict=("rejected", "unsafe path in zip (absolute or '..'): not extracted"))
            continue
        rel = name.replace("\\", "/")
        if _is_hidden(rel):
            yield Entry(rel, verdict=("ignored", "hidden or system file"))
        elif stat.S_ISLNK(info.external_attr >> 16):
            yield Entry(rel, verdict=("rejected", "symlink inside the zip (not followed)"))
        elif info.flag_bits & 0x1:
            yield Entry(rel, verdict=("rejected", "encrypted zip member"))
        else:
            yield Entry(rel, read=_read_member(archive, info))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[int], bytes]:
    def read(limit: int) -> bytes:
        # Read at most limit+1 bytes whatever the header claims: a zip bomb stops here.
        with archive.open(info) as handle:
            return handle.read(limit + 1)

    return read


def read_caption(entry: Entry) -> str:
    """A caption file's text, or "" when it is unreadable or empty."""
    try:
        raw = entry.read(MAX_CAPTION_BYTES) if entry.read else b""
    except OSError:
        return ""
    if len(raw) > MAX_CAPTION_BYTES:
        return ""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return " ".join(text.split())


def pair_captions(entries: list[Entry]) -> tuple[dict[str, str], dict[str, str]]:
    """Map image rel -> caption rel, and caption rel -> image rel, by folder and stem."""
    by_stem: dict[PurePosixPath, list[Entry]] = {}
    for entry in entries:
        if entry.verdict is None:
            rel = PurePosixPath(entry.rel)
            by_stem.setdefault(rel.with_suffix(""), []).append(entry)
    caption_of: dict[str, str] = {}
    image_of: dict[str, str] = {}
    for group in by_stem.values():
        captions = sorted(
            (e for e in group if PurePosixPath(e.rel).suffix.lower() in CAPTION_SUFFIXES),
            key=lambda e: CAPTION_SUFFIXES.index(PurePosixPath(e.rel).suffix.lower()),
        )
        images = [e for e in group if PurePosixPath(e.rel).suffix.lower() not in CAPTION_SUFFIXES]
        if captions and images:
            for image in images:
                caption_of[image.rel] = captions[0].rel
            for caption in captions:
                image_of[caption.rel] = images[0].rel
    return caption_of, image_of


def all_captioned(photos: Path, exclude: Path | None = None) -> bool:
    """Whether every file of `photos` that may be a photo comes with its caption file (then BLIP has nothing
    to caption, unless asked to caption again)."""
    try:
        with open_input(Path(photos), exclude=exclude) as entries:
            caption_of, _ = pair_captions(entries)
            images = [
                e for e in entries if e.verdict is None and PurePosixPath(e.rel).suffix.lower() not in CAPTION_SUFFIXES
            ]
    except (OSError, ValueError):
        return False
    return bool(images) and all(e.rel in caption_of for e in images)


@contextmanager
def open_input(photos: Path, exclude: Path | None = None) -> Iterator[list[Entry]]:
    """Yield the entries of a folder (recursive) or a `.zip`, sorted by path.

    Duplicate names in a zip keep their first entry. `exclude` is a folder
    (the work folder) to leave out when it lies inside the input.
    """
    photos = Path(photos)
    exclude = exclude.resolve() if exclude is not None else None
    if photos.is_dir():
        yield sorted(_walk_folder(photos, exclude), key=lambda e: e.rel)
    elif photos.is_file() and zipfile.is_zipfile(photos):
        try:
            with zipfile.ZipFile(photos) as archive:
                entries: dict[str, Entry] = {}
                for entry in _zip_entries(archive):
                    entries.setdefault(entry.rel, entry)
                yield list(entries.values())
        except zipfile.BadZipFile as err:
            raise InputError(f"{photos}: corrupt zip: {err}") from err
    elif photos.exists():
        raise InputError(f"{photos}: expected a folder of photos or a .zip, got another kind of file")
    else:
        raise InputError(f"{photos}: no such folder or zip")


def fingerprint_input(photos: Path, exclude: Path | None = None) -> str:
    """A content hash of the input: changes when any file is added, removed or edited.

    A zip is hashed as bytes; a folder by each entry's path and content (a
    link by its target, never by what it points to).
    """
    digest = hashlib.sha256()
    photos = Path(photos)
    if photos.is_file():
        with open(photos, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    root = photos.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if exclude is None or (here / d).resolve() != exclude.resolve())
        for name in sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            if path.is_symlink():
                digest.update(b"link:" + os.readlink(path).encode() + b"\0")
            elif path.is_file():
                try:
                    with open(path, "rb") as handle:
                        for block in iter(lambda h=handle: h.read(1 << 20), b""):
                            digest.update(block)
                except OSError as err:  # unreadable now: ingest will say so; the key still changes
                    digest.update(f"unreadable:{err.errno}".encode())
            digest.update(b"\1")
    return digest.hexdigest()
