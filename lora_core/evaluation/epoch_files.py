"""A run folder as selection sees it: the epoch files, the subject's photos, and what selection writes back.

Our subject folder (`<token>/result_current/`) or a kohya output folder holds
one LoRA file per epoch, `<name>-000001.safetensors`. Selection reads those and
the reference photos, and writes `selection.json` and the chosen epoch as
`<name>.safetensors` beside them; no epoch file is ever lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lora_core.config.lora_config import LoraConfig
from lora_core.families import family_of_lora
from lora_core.foundation.errors import UserError
from lora_core.foundation.fs import atomic_write_bytes, atomic_write_text
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import LoraFileError, read_metadata

__all__ = ["RunFiles", "SelectionError", "config_for_run", "find_run", "publish_choice", "write_selection"]

EPOCH_FILE = re.compile(r"(?P<name>.+)-(?P<epoch>\d{6})\.safetensors")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SelectionError(UserError, ValueError):
    """A run folder selection cannot work on; the message says what is missing."""


@dataclass(frozen=True)
class RunFiles:
    """One training run as selection sees it: epoch files, where results go, the subject's photos."""

    folder: Path  # the epoch files; selection.json and the chosen `<name>.safetensors` go here too
    name: str  # kohya's output name: `<name>-000001.safetensors`
    epochs: dict[int, Path]
    photos: tuple[Path, ...] = ()  # reference photos of the subject (fidelity, copies)
    layout: SubjectLayout | None = None  # our subject folder: validation loss on its captioned images

    @property
    def grids(self) -> Path:
        return self.folder / "selection"

    @property
    def selection_json(self) -> Path:
        return self.folder / "selection.json"

    @property
    def final(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    @property
    def txt2img(self) -> Path:
        """Where the chosen epoch's renders go: the recipe's `txt2img-images/` (beside a kohya folder's files)."""
        return (self.layout.txt2img_images if self.layout else self.folder / "txt2img-images").resolve()

    def grid_folder(self, epoch: int | None) -> Path:
        return self.grids / ("base" if epoch is None else f"epoch-{epoch:06d}")


def config_for_run(config: LoraConfig, run: RunFiles) -> LoraConfig:
    """`config`, told the base model's family when the run's own files say it (kohya's `ss_base_model_version`)."""
    family = family_of_lora(read_metadata(next(iter(run.epochs.values()))))
    if family is None or family.name == config.model_family:
        return config
    return LoraConfig.model_validate(config.model_dump() | {"model_family": family.name})


def _photos_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file() and not p.is_symlink()
    )


def find_run(folder: Path, token: str, photos: Path | None = None) -> RunFiles:
    """A run folder: our subject folder (`<token>/` or its `result_current/`) or a kohya output folder.

    Epoch files are kohya's `<name>-000001.safetensors`; the output name is
    `token` where such files exist, else the only name there is. kohya saves
    the last epoch as `<name>.safetensors` alone; its `ss_epoch` says which.
    Reference photos: `photos` if given, else our run's training images.
    """
    folder = Path(folder)
    if (folder / "result_current").is_dir():
        folder = folder / "result_current"
    if not folder.is_dir():
        raise SelectionError(f"{folder}: no such run folder")
    runs: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if match := EPOCH_FILE.fullmatch(path.name):
            runs.setdefault(match["name"], {})[int(match["epoch"])] = path
    if token in runs:
        name = token
    elif len(runs) == 1:
        name = next(iter(runs))
    elif runs:
        raise SelectionError(
            f"{folder}: epoch files of several runs ({', '.join(sorted(runs))}); pick one with --token"
        )
    else:
        raise SelectionError(f"{folder}: no epoch files (kohya names them <name>-000001.safetensors)")
    epochs = runs[name]
    last = folder / f"{name}.safetensors"
    if last.is_file():
        try:
            saved = int(read_metadata(last).get("ss_epoch", "0") or 0)
        except (LoraFileError, ValueError):
            saved = 0
        if saved and saved not in epochs and saved > max(epochs):
            epochs[saved] = last
    layout = None
    if folder.name == "result_current" and (folder.parent / "training_images").is_dir():
        candidate = SubjectLayout(folder.parent.parent, folder.parent.name)
        if candidate.buckets_csv.is_file() and candidate.captions_csv.is_file():
            layout = candidate
    if photos is not None:
        if not Path(photos).is_dir():
            raise SelectionError(f"{photos}: not a folder of photos")
        references = _photos_in(photos)
    elif layout is not None:
        references = _photos_in(layout.training_images)
    else:
        references = []
    return RunFiles(folder, name, dict(sorted(epochs.items())), tuple(references), layout)


def publish_choice(run: RunFiles, epoch: int) -> Path:
    """`<name>.safetensors` becomes the chosen epoch; every epoch file stays.

    kohya's last epoch may exist only as `<name>.safetensors`: it is first kept
    as `<name>-00000N.safetensors`, so choosing another epoch never loses it.
    """
    for number, path in run.epochs.items():
        if path == run.final:
            kept = run.folder / f"{run.name}-{number:06d}.safetensors"
            if not kept.exists():
                atomic_write_bytes(kept, path.read_bytes())
    source = run.epochs[epoch]
    if source == run.final:
        return run.final
    atomic_write_bytes(run.final, source.read_bytes())
    return run.final


def write_selection(run: RunFiles, record: dict) -> None:
    """`selection.json`, atomically."""
    atomic_write_text(run.selection_json, json.dumps(record, indent=2))
