"""Training images the dataset checks replaced or left out, kept by content so any decision can be undone.

The checks turn, flip or set aside images in the training folder. Each
original (as ingest wrote it) and each image set aside is copied here first,
so a changed policy starts again from the originals and a rejected photo can
come back, without decoding the user's photos again. Records are keyed by the
source photo's hash, so ingest renumbering the images does not confuse them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from PIL import Image

from lora_core.foundation.fs import atomic_output, atomic_write_text, ensure_inside, sha256_file
from lora_core.foundation.layout import SubjectLayout

__all__ = ["ImageStore"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ImageStore:
    """Originals and set-aside images by content hash, and what the checks wrote for each source photo.

    `original(row)` is the image as ingest wrote it, wherever it now is.
    """

    def __init__(self, layout: SubjectLayout) -> None:
        self.layout = layout
        self.folder = layout.image_store
        self._state_file = self.folder / "written.json"
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        # source sha256 -> {"original": sha of ingest's image, "written": sha of what the checks left ("" if none)}
        self._written: dict[str, dict[str, str]] = {
            source: record
            for source, record in (state.items() if isinstance(state, dict) else [])
            if isinstance(record, dict)
            and all(_SHA256.fullmatch(record.get(k) or "0" * 64) for k in ("original", "written"))
        }

    def _stored(self, sha: str) -> Path:
        if not _SHA256.fullmatch(sha or ""):
            raise ValueError(f"not a sha256: {sha!r}")
        return self.folder / f"{sha}.png"

    def _target(self, row: dict) -> Path:
        return ensure_inside(self.layout.root, self.layout.root / row["image"])

    def original(self, row: dict) -> Path:
        current = self._target(row)
        record = self._written.get(row["sha256"])
        ours = record is not None and self._stored(record["original"]).is_file()
        if current.is_file() and not (ours and sha256_file(current) == record["written"]):
            return current  # as ingest wrote it
        if ours:
            return self._stored(record["original"])
        raise FileNotFoundError(f"{current}: training image missing and not in the image store")

    def _keep(self, row: dict) -> str:
        """Copy the original into the store (before it is replaced or removed); returns its hash."""
        source = self.original(row)
        sha = sha256_file(source)
        if source.parent != self.folder and not self._stored(sha).is_file():
            with atomic_output(self._stored(sha)) as tmp:
                shutil.copyfile(source, tmp)
        return sha

    def write(self, row: dict, image: Image.Image | None = None) -> None:
        """Make `row`'s training image `image`, or the original when None (undoing an earlier fix)."""
        target = self._target(row)
        if image is None:
            source = self.original(row)
            original = sha256_file(source)
            if source != target:  # fixed or set aside earlier: the original comes back
                with atomic_output(target) as tmp:
                    shutil.copyfile(source, tmp)
            with Image.open(target) as written_image:
                size = written_image.size
            written = original
        else:
            original = self._keep(row)
            with atomic_output(target) as tmp:
                image.save(tmp, format="PNG", compress_level=4)
            written, size = sha256_file(target), image.size
        self._record(row, original, written)
        row["checked_sha256"] = written
        row["width"], row["height"] = size

    def set_aside(self, row: dict) -> None:
        """Leave `row`'s image out of training (kept in the store) and mark the row rejected."""
        target = self._target(row)
        if row["checked_sha256"]:  # a later stage: keep the image as the checks wrote it
            self.restore(row)
            current = row["checked_sha256"]
            if not self._stored(current).is_file():
                with atomic_output(self._stored(current)) as tmp:
                    shutil.copyfile(target, tmp)
        else:
            current = self._keep(row)
            self._record(row, current, "")
        target.unlink(missing_ok=True)
        row.update(status="rejected", reason=f"dataset checks: {row['check_notes']}", image="", checked_sha256=current)

    def restore(self, row: dict) -> None:
        """Put back the image the checks wrote for `row` if it was set aside or changed since."""
        target = self._target(row)
        if target.is_file() and sha256_file(target) == row["checked_sha256"]:
            return
        stored = self._stored(row["checked_sha256"])
        if not stored.is_file():
            raise FileNotFoundError(f"{target}: training image missing and not in the image store")
        with atomic_output(target) as tmp:
            shutil.copyfile(stored, tmp)

    def _record(self, row: dict, original: str, written: str) -> None:
        self._written[row["sha256"]] = {"original": original, "written": written}
        atomic_write_text(self._state_file, json.dumps(self._written, indent=1, sort_keys=True))
