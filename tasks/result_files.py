"""Where a stage's Prefect result records go: the subject's `.pipeline/prefect-results/`, written atomically.

Prefect's `LocalFileSystem` writes a record in place, so a kill mid-write
leaves a truncated record (the cache lookup reads it as a miss and the stage
runs again). Written through `lora_core.foundation.fs.atomic_write_bytes`, a
record is whole or absent, as every file of ours is. Prefect takes a storage
block for a task only once it is saved on the server: one block per subject
folder, named after it (`lora-results-<digest>`), saved once per process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem

from lora_core.foundation.fs import atomic_write_bytes

__all__ = ["AtomicResultFiles", "result_files"]

_SAVED: dict[tuple[str, str], AtomicResultFiles] = {}


class AtomicResultFiles(LocalFileSystem):
    """A `LocalFileSystem` whose writes are atomic (a temporary file renamed over the record)."""

    _block_type_name = "LoRA Result Files"
    _description = "A subject folder's Prefect result records, written atomically (subject-lora)."

    def _write(self, path: str, content: bytes) -> str:
        target: Path = self._resolve_path(path)  # Prefect's own check: nothing outside the base path
        if target.exists() and not target.is_file():
            raise ValueError(f"Path {target} already exists and is not a file.")
        atomic_write_bytes(target, content)
        return str(target)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    def write_path(self, path: str, content: bytes, **_: Any) -> str:  # type: ignore[override]
        # Prefect's own is dispatched, and called with `_sync=True` by its result store.
        return self._write(path, content)


def result_files(folder: Path) -> AtomicResultFiles:
    """The saved storage block for `folder` on the current Prefect API (saved on first use in this process)."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    key = (str(folder), str(PREFECT_API_URL.value()))
    if key not in _SAVED:
        block = AtomicResultFiles(basepath=str(folder))
        name = f"lora-results-{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}"
        try:
            block.save(name, overwrite=True)
        except ObjectAlreadyExists:  # another subject registered the block type at the same moment: it is there now
            block.save(name, overwrite=True)
        _SAVED[key] = block
    return _SAVED[key]
