"""Safe file-system primitives: atomic writes and path containment.

Every artifact the pipeline writes goes through `atomic_write_*`, so a crash
leaves either the old file or the new one, never half of one. The new file gets
the mode any other program would give it under the user's umask (a temporary
file starts at 0600, which would keep a LoRA from a UI running as another
user), and a full disk is said in words, naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_core.foundation.errors import UserError

__all__ = [
    "DiskFullError",
    "JsonCache",
    "PathEscapeError",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "content_stamp",
    "current_umask",
    "disk_full",
    "ensure_inside",
    "remove_stale_temps",
    "sha256_bytes",
    "sha256_file",
    "source_version",
    "stamp_matches",
]


class PathEscapeError(UserError, ValueError):
    """A path would leave the folder it must stay in."""


class DiskFullError(UserError, OSError):
    """The disk (or the user's quota) is full: nothing was replaced, and the same command continues once
    there is room."""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# atomic_output's temp names: mkstemp's 8 random characters between our prefix and suffix.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temp files killed writes left under `root`; returns them.

    A SIGKILL or power loss skips `atomic_output`'s clean-up, and each kill
    would leave one more. Call it only while no other process can write under
    `root` (holding its subject lock): a live write's temp file looks the same.
    """
    removed = []
    for folder, _, names in os.walk(root):  # never into a linked folder: os.walk does not follow links
        for name in names:
            path = Path(folder) / name
            if _TEMP_NAME.fullmatch(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` on success.

    The temporary file lives in the same folder so the final `os.replace` is an
    atomic rename on POSIX and Windows alike. A full disk raises `DiskFullError`
    naming `path`, with the old file (if any) still in place.
    """
    path = Path(path)
    with _disk_full_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _disk_full_named(path):
            os.chmod(tmp, 0o666 & ~current_umask())
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    """Turn an OSError saying the disk is full into a `DiskFullError` naming `path` and the room left."""
    try:
        yield
    except OSError as err:
        named = disk_full(err, path)
        if named is None:
            raise
        raise named from err


def disk_full(err: BaseException, path: Path | str | None = None) -> DiskFullError | None:
    """The `DiskFullError` naming `path` (default: the file the error names) that `err` is, when it says the disk
    or quota is full; None for any other error. For writes that are not ours (Prefect's result records)."""
    if isinstance(err, DiskFullError):
        return err
    if not isinstance(err, OSError) or err.errno not in _DISK_FULL:
        return None
    where = path if path is not None else err.filename
    if where is None:  # a write() or flush() names no file
        return DiskFullError(
            "the disk is full: a write failed; the files written before are intact: free some space and run the "
            "same command again to continue"
        )
    path = Path(where)
    try:
        free = f"{shutil.disk_usage(path if path.is_dir() else path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"the disk is full: could not write {path} ({free}); the files written before are intact: free "
        "some space and run the same command again to continue"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def ensure_inside(root: Path, path: Path) -> Path:
    """Return `path` resolved, or raise if it resolves outside `root`.

    Resolution follows symlinks, so a link inside `root` that points elsewhere
    is caught too.
    """
    root_resolved = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise PathEscapeError(f"{path} resolves to {resolved}, outside {root_resolved}")
    return resolved


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_stamp(payload: Any) -> str:
    """A hash of what a stage's files were made from (`payload`: its inputs and settings, JSON-able).

    A stage writes it beside its output; before a cached result is trusted the
    stamp must match the current request, so going back to earlier settings
    never leaves the other settings' files in place.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stamp_matches(path: Path, stamp: str) -> bool:
    """True when the stamp file at `path` holds `stamp`."""
    try:
        return Path(path).read_text(encoding="utf-8") == stamp
    except OSError:
        return False


def source_version(*paths: str | Path) -> str:
    """A hash of source files (modules' `__file__`), so results cached by their code go stale with it."""
    return content_stamp([sha256_file(Path(path)) for path in paths])


class JsonCache:
    """One small JSON file per content hash and `salt` (the model and settings that made it).

    One file per entry means a run cut short keeps every entry it wrote; a
    missing or damaged entry reads as None and is made again.
    """

    def __init__(self, folder: Path, salt: str) -> None:
        self.folder, self.salt = Path(folder), salt

    def path(self, sha: str) -> Path:
        return self.folder / f"{hashlib.sha256((sha + self.salt).encode()).hexdigest()}.json"

    def get(self, sha: str) -> Any:
        try:
            return json.loads(self.path(sha).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, sha: str, value: Any) -> None:
        atomic_write_text(self.path(sha), json.dumps(value))
