"""The recipe's folder layout for one subject, and the trigger token that names it.

<workdir>/<token>/
    training_images/<repeats>_<token>/   the images kohya reads (repeats in the name)
    result_current/                      LoRA files, one per epoch
    txt2img-images/                      images generated with the LoRA
    manifest.csv                         what ingest did with every input file
    buckets.csv                          each image's bucket, resize and crop
    captions.csv                         each image's caption and where it came from
    .pipeline/                           the pipeline's own bookkeeping (caches, results, run state, lock):
                                         nothing a user reads; deleting it costs only recomputation
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lora_core.foundation.errors import UserError
from lora_core.foundation.fs import ensure_inside

__all__ = ["BOOKKEEPING", "InvalidTokenError", "SubjectLayout", "repeats_for", "validate_token"]

_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The recipe: "400 / number of images ... will be the number of repeats".
SEED_REPEAT_BUDGET = 400
# One hidden folder holds every file the pipeline keeps for itself, so the subject folder shows the recipe's
# layout and the files a user reads. Its entries used to sit in the subject folder as dot-files.
BOOKKEEPING = ".pipeline"
_OLD_ENTRIES = {
    ".caption-cache": "caption-cache",
    ".check-cache": "check-cache",
    ".image-store": "image-store",
    ".ingest-stamp": "ingest-stamp",
    ".captions-settings": "captions-settings",
    ".prefect-results": "prefect-results",
    ".train-state": "train-state",
}


class InvalidTokenError(UserError, ValueError):
    """The trigger token cannot name a folder safely."""


def validate_token(token: str) -> str:
    """Return `token` if it is 1-64 letters, digits, `_` or `-`, starting with a letter or digit.

    The token names folders and files, so anything that could be a path
    separator, a dot-folder or a command-line flag is refused.
    """
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise InvalidTokenError(
            f"invalid token {token!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no spaces, dots or path separators)"
        )
    return token


def repeats_for(n_images: int, num_repeats: int | None = None) -> int:
    """Kohya repeats per image: the config's value, else 400 / N (at least 1), as the recipe does."""
    if num_repeats is not None:
        return max(1, int(num_repeats))
    return max(1, SEED_REPEAT_BUDGET // max(1, n_images))


@dataclass(frozen=True)
class SubjectLayout:
    """Paths of one subject's folder under the work folder."""

    workdir: Path
    token: str

    def __post_init__(self) -> None:
        validate_token(self.token)
        ensure_inside(self.workdir, self.root)

    @property
    def root(self) -> Path:
        return Path(self.workdir) / self.token

    @property
    def training_images(self) -> Path:
        return self.root / "training_images"

    def class_dir(self, repeats: int) -> Path:
        """`training_images/<repeats>_<token>/`, the folder name kohya parses repeats from."""
        return self.training_images / f"{repeats}_{self.token}"

    @property
    def result_current(self) -> Path:
        return self.root / "result_current"

    @property
    def txt2img_images(self) -> Path:
        return self.root / "txt2img-images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def buckets_csv(self) -> Path:
        return self.root / "buckets.csv"

    @property
    def captions_csv(self) -> Path:
        return self.root / "captions.csv"

    @property
    def bookkeeping(self) -> Path:
        """`.pipeline/`: the caches, results, run state and lock (see `BOOKKEEPING`)."""
        return self.root / BOOKKEEPING

    @property
    def captions_settings(self) -> Path:
        """What the caption files were made with (see `lora_core.dataset.captioning.settings_stamp`)."""
        return self.bookkeeping / "captions-settings"

    @property
    def lock(self) -> Path:
        """Held by the one process working on this subject (see `lora_core.foundation.lock`)."""
        return self.bookkeeping / "lock"

    @property
    def caption_cache(self) -> Path:
        """BLIP's output per image, model and settings, so no image is captioned twice."""
        return self.bookkeeping / "caption-cache"

    def epoch_lora(self, epoch: int) -> Path:
        """`result_current/<token>-000001.safetensors`, kohya's name for an epoch's LoRA."""
        return self.result_current / f"{self.token}-{epoch:06d}.safetensors"

    @property
    def samples(self) -> Path:
        """`result_current/sample/`, where sd-scripts puts sample images."""
        return self.result_current / "sample"

    @property
    def final_lora(self) -> Path:
        return self.result_current / f"{self.token}.safetensors"

    def train_state(self, run_key: str) -> Path:
        """Where one run keeps what a new process needs to continue it, per epoch."""
        return self.bookkeeping / "train-state" / run_key[:16]

    @property
    def ingest_stamp(self) -> Path:
        """What the training folder was made from (see `lora_core.foundation.fs.content_stamp`)."""
        return self.bookkeeping / "ingest-stamp"

    @property
    def check_cache(self) -> Path:
        """The dataset checks' per-image results, by image content, so no photo is analysed twice."""
        return self.bookkeeping / "check-cache"

    @property
    def image_store(self) -> Path:
        """Originals of images the checks turned, flipped or set aside (see `lora_core.dataset.image_store`)."""
        return self.bookkeeping / "image-store"

    @property
    def prefect_results(self) -> Path:
        """Where Prefect persists task results and cache records for this subject."""
        return self.bookkeeping / "prefect-results"

    def create(self) -> None:
        """Create the folders that exist before any training (idempotent)."""
        for folder in (self.training_images, self.result_current, self.txt2img_images):
            folder.mkdir(parents=True, exist_ok=True)

    def move_old_bookkeeping(self) -> list[str]:
        """Move a subject folder's dot-file bookkeeping from before `.pipeline/` into it, so an upgrade keeps
        its caches and finished epochs; returns the entries moved."""
        moved = []
        for old, new in _OLD_ENTRIES.items():
            source, target = self.root / old, self.bookkeeping / new
            if (source.exists() or source.is_symlink()) and not target.exists():
                if source.is_symlink():  # never follow a link out of the subject folder
                    continue
                self.bookkeeping.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                moved.append(old)
        return moved
