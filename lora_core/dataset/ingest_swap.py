"""Putting a new class folder in place of the old one so that no kill or error loses a user's sidecar files.

Users edit the captions (`0003.txt`) beside the training images; a re-ingest
renumbers the images and must keep every caption beside its own photo. The
manifest on disk is what pairs a number with a photo (`_carry_sidecars` in
`lora_core.dataset.ingest` reads it), so it must always describe the class folder on
disk. The swap happens inside the staging root (`training_images/.ingest-*`):

1. the sidecars are linked or copied (never moved) into the new folder, so the
   live folder stays whole until the swap;
2. the new manifest is written into the staging root, then the journal
   (`swap.json`, naming the new folder) and the ingest stamp is removed: from
   here on a later run must not trust the layout before `recover` has run;
3. the old class folder(s) go to `previous/`, the new folder into place, the
   staged manifest over the manifest, and the journal is removed.

`recover` (on the next run's start, or in ingest's `finally`) reads a leftover
journal: a new folder still in staging means the swap did not happen, and the
old folders go back from `previous/`; a new folder in place means it did, and
the staged manifest is installed. Only then is the staging root deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lora_core.dataset.manifest import write_manifest
from lora_core.foundation.fs import atomic_write_bytes, atomic_write_text
from lora_core.foundation.layout import SubjectLayout

__all__ = ["JOURNAL", "clear_leftovers", "link_or_copy", "recover", "settle", "swap_in"]

JOURNAL = "swap.json"
_MANIFEST = "manifest.csv"
_PREVIOUS = "previous"


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` as `target` (instant, no extra space), else copy it; a symlink is never followed."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # another file system, no hard links there, or a link count at its limit
        shutil.copy2(source, target, follow_symlinks=False)


def _class_dirs(layout: SubjectLayout) -> list[Path]:
    """The subject's class folders on disk (`<repeats>_<token>`), the staging roots aside."""
    return [
        path
        for path in layout.training_images.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.name.endswith(f"_{layout.token}")
    ]


def swap_in(layout: SubjectLayout, staging_root: Path, new_dir: Path, rows: list[dict]) -> None:
    """Put `new_dir` (in `staging_root`) in place of the class folder(s) and `rows` as the manifest."""
    write_manifest(staging_root / _MANIFEST, rows)  # validated before anything live changes
    atomic_write_text(staging_root / JOURNAL, json.dumps({"class_dir": new_dir.name}))
    layout.ingest_stamp.unlink(missing_ok=True)  # a layout mid-swap is never taken for a finished ingest
    previous = staging_root / _PREVIOUS
    previous.mkdir()
    for old in _class_dirs(layout):
        old.rename(previous / old.name)
    new_dir.rename(layout.training_images / new_dir.name)
    recover(layout, staging_root)


def recover(layout: SubjectLayout, staging_root: Path) -> None:
    """Finish or undo the swap a leftover journal in `staging_root` records, so the manifest matches the folder.

    Either way the user's sidecar files stay beside the images the manifest
    names. Without a journal the swap never began and the live folder is whole.
    Idempotent: a kill while recovering is recovered by the next run.
    """
    journal = staging_root / JOURNAL
    if not journal.is_file():
        return
    name = json.loads(journal.read_text(encoding="utf-8"))["class_dir"]
    if (layout.training_images / name).is_dir() and not (staging_root / name).exists():
        staged = (staging_root / _MANIFEST).read_bytes()  # the swap happened: the manifest must say so
        if not layout.manifest.is_file() or layout.manifest.read_bytes() != staged:
            atomic_write_bytes(layout.manifest, staged)
    else:  # it did not: the old folders go back, and the manifest on disk still describes them
        previous = staging_root / _PREVIOUS
        for old in sorted(previous.iterdir()) if previous.is_dir() else []:
            if not (layout.training_images / old.name).exists():
                old.rename(layout.training_images / old.name)
    journal.unlink()


def settle(layout: SubjectLayout, staging_root: Path) -> None:
    """Recover what `staging_root` records, then delete it; if recovering fails it stays for the next run."""
    recover(layout, staging_root)
    shutil.rmtree(staging_root, ignore_errors=True)


def clear_leftovers(layout: SubjectLayout) -> None:
    """Settle every staging root a killed run left behind, before a new ingest reads the manifest."""
    for leftover in sorted(layout.training_images.glob(".ingest-*")):
        settle(layout, leftover)
