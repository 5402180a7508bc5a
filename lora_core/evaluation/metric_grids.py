"""The metric grids: one fixed grid of renders per epoch and one for the base model, kept on disk.

Every epoch renders the same grid (the neutral portrait and a few
recontextualisation and style prompts with the token, and the class prompt
without it) at the same seeds, and so does the base model once, so any
difference between two grids is the LoRA's. Grids are kept on disk beside the
epoch files, keyed by the LoRA's bytes and the grid's settings, so selecting
again, or after a resume, renders only what is new. Each grid's record keeps
the epoch's fixed losses beside it (on the training images and on the held-out
ones). The chosen epoch's renders at several strengths are made by the same
renderer, and every epoch's grid is also kept as one contact sheet to compare by eye.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lora_core.config.lora_config import LoraConfig, Sampler
from lora_core.config.settings import DEFAULT_CLASS_PROMPTS, SelectionSettings, SubjectType
from lora_core.evaluation.epoch_files import RunFiles
from lora_core.families import network_shape
from lora_core.families.family import LoadedModel
from lora_core.foundation.fs import atomic_output, atomic_write_text, sha256_file
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import LoraFile, read_lora
from lora_core.training.precision import Precision, resolve_precision
from lora_core.training.sampling import SamplePrompt, SampleSpec, contact_sheet, render

if TYPE_CHECKING:
    from lora_core.training.trainer import Trainer

__all__ = [
    "LOSSES",
    "GridRenderer",
    "contact_sheets_folder",
    "grid_key",
    "grids_intact",
    "load_grid",
    "metric_spec",
    "render_grids",
    "render_strengths",
    "save_grid",
    "write_contact_sheets",
]

# The fixed losses a grid's record keeps (`GridRenderer.losses`).
LOSSES = ("training_loss", "heldout_loss")


def metric_spec(
    settings: SelectionSettings,
    token: str,
    subject_type: SubjectType | str,
    resolution: int,
    sampler: Sampler | str = Sampler.euler_a,
) -> SampleSpec:
    """The metric grid: the token prompts, then the class prompt without the token (always last),
    drawn with the run's `sample_sampler`, so the grids look like the samples the user watched."""
    size = settings.size or resolution
    defaults = {"width": size, "height": size, "steps": settings.steps, "seeds": tuple(settings.seeds)}
    class_prompt = settings.class_prompt or DEFAULT_CLASS_PROMPTS[str(SubjectType(subject_type))]
    lines = [prompt.replace("{token}", token) for prompt in settings.prompts] + [class_prompt]
    return SampleSpec(tuple(SamplePrompt.parse(line, **defaults) for line in lines), sampler=sampler)


def grid_key(spec: SampleSpec, base_identity: str, lora_sha: str | None) -> str:
    """What makes a grid this grid: its prompts, seeds and sampler, the base model, and the LoRA's bytes."""
    # 2: the VAE decodes in fp32 (fp16 gave SDXL black/NaN grids), so grids rendered before are redone.
    text = json.dumps([repr(spec), base_identity, lora_sha, 2])
    return hashlib.sha256(text.encode()).hexdigest()


def save_grid(folder: Path, key: str, grid: list[list[Image.Image]], losses: dict[str, float | None]) -> None:
    """Each image as `p00_s1.png`, then `grid.json` last: a grid counts only when its record is there.
    `losses`: the epoch's fixed losses (`LOSSES`; None where unmeasured)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, row in enumerate(grid):
        names.append([])
        for column, image in enumerate(row):
            name = f"p{index:02d}_{column}.png"
            with atomic_output(folder / name) as tmp:
                image.save(tmp, format="PNG")
            names[-1].append(name)
    record = {"key": key, "files": names} | {name: losses.get(name) for name in LOSSES}
    atomic_write_text(folder / "grid.json", json.dumps(record))


def load_grid(folder: Path, key: str | None) -> tuple[list[list[Image.Image]], dict[str, float | None]] | None:
    """The grid saved under `folder` for `key` (None: whatever is there) and its losses, or None when
    missing, damaged or made otherwise. A record written before the held-out split has its training
    images' loss under its old name, `validation_loss`."""
    try:
        record = json.loads((Path(folder) / "grid.json").read_text())
        if key is not None and record["key"] != key:
            return None
        grid = []
        for row in record["files"]:
            images = []
            for name in row:
                with Image.open(Path(folder) / name) as image:
                    images.append(image.convert("RGB"))
            grid.append(images)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    losses = {name: record.get(name) for name in LOSSES}
    if losses["training_loss"] is None:
        losses["training_loss"] = record.get("validation_loss")
    return grid, losses


class GridRenderer:
    """The base model with one LoRA network on it: renders any epoch's grid, and measures its losses.

    With our subject folder the network is a `Trainer`'s, built with the run's
    settings, so the fixed losses on its captioned images come with it: on the
    images trained on and on those held out (`validation_split`); a kohya output
    folder alone gets renders only (its losses are reported unavailable).
    Either way it renders in the config's `mixed_precision`, as the trainer's
    samples are, with the VAE and the LoRA weights in fp32.
    """

    def __init__(
        self, base: LoadedModel, config: LoraConfig, lora: LoraFile, layout: SubjectLayout | None, device: str | None
    ) -> None:
        from lora_core.training.network import LoraNetwork
        from lora_core.training.trainer import Trainer

        rank, alpha = network_shape(lora.modules, base.family)
        self.base = base
        if layout is not None:
            fields = {"network_dim": rank, "network_alpha": alpha, "train_text_encoder": True}
            config = LoraConfig.model_validate(config.model_dump() | fields)
            self.trainer: Trainer | None = Trainer(config, base, layout, device=device, show_progress=False)
            self.network = self.trainer.network
            self.precision: Precision = self.trainer.precision
        else:
            self.trainer = None
            self.precision = resolve_precision(config.mixed_precision, device)
            self.network = LoraNetwork(base, rank, alpha, train_text_encoder=True)
            base.place(self.precision.device, self.precision.dtype)
            for param in self.network.parameters():  # cast with their layers above; the update stays fp32
                param.data = param.data.float()

    @classmethod
    def on_trainer(cls, trainer: Trainer) -> GridRenderer:
        """A renderer on a loaded run's trainer (its models, network, precision and captioned images), so the
        samples and select stages hold no second copy of the base model."""
        renderer = cls.__new__(cls)
        renderer.base, renderer.trainer = trainer.base, trainer
        renderer.network, renderer.precision = trainer.network, trainer.precision
        return renderer

    def grid(self, spec: SampleSpec, lora: LoraFile | None, strength: float = 1.0) -> list[list[Image.Image]]:
        """`spec` rendered with `lora` at `strength` (None: the base model alone)."""
        self._apply(lora, strength)
        with self.trainer.models_on_device() if self.trainer else nullcontext():
            return render(self.base, spec, self.precision)

    def losses(self, lora: LoraFile | None) -> dict[str, float | None]:
        """`lora`'s fixed losses (`LOSSES`), None where they cannot be measured."""
        if self.trainer is None:
            return dict.fromkeys(LOSSES)
        self._apply(lora, 1.0)
        return {"training_loss": self.trainer.training_loss(), "heldout_loss": self.trainer.heldout_loss()}

    def _apply(self, lora: LoraFile | None, strength: float) -> None:
        if lora is None:
            self.network.clear()
        else:
            self.network.load(lora, strength)


def _grid_targets(run: RunFiles) -> list[tuple[int | None, Path | None]]:
    return [(None, None), *run.epochs.items()]


def _recorded_key(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / "grid.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def grids_intact(run: RunFiles, spec: SampleSpec, base_identity: str) -> bool:
    """Every epoch's grid and the base model's are on disk for these files and settings."""
    return all(
        _recorded_key(run.grid_folder(epoch)) == grid_key(spec, base_identity, sha256_file(path) if path else None)
        for epoch, path in _grid_targets(run)
    )


def render_grids(
    run: RunFiles,
    spec: SampleSpec,
    base_identity: str,
    open_renderer: Callable[[LoraFile], GridRenderer],
    on_grid: Callable[[int | None, list[list[Image.Image]]], None] | None = None,
) -> list[int]:
    """Render the base model's grid and each epoch's that is not on disk yet; returns the epochs rendered
    (0 for the base model). The model is loaded only when something is missing."""
    renderer: GridRenderer | None = None
    rendered = []
    for epoch, path in _grid_targets(run):
        key = grid_key(spec, base_identity, sha256_file(path) if path else None)
        folder = run.grid_folder(epoch)
        if _recorded_key(folder) == key:
            continue
        lora = read_lora(path) if path else None
        renderer = renderer or open_renderer(lora or read_lora(next(iter(run.epochs.values()))))
        grid = renderer.grid(spec, lora)
        save_grid(folder, key, grid, renderer.losses(lora))
        if on_grid is not None:
            on_grid(epoch, grid)
        rendered.append(epoch or 0)
    return rendered


def contact_sheets_folder(run: RunFiles) -> Path:
    """Where `write_contact_sheets` puts them: `selection/contact-sheets/` beside the grids."""
    return run.grids / "contact-sheets"


def write_contact_sheets(run: RunFiles, spec: SampleSpec) -> Path:
    """Each grid on disk as one labelled image (prompts down, seeds across), `base.png` and
    `epoch-00000N.png`, to compare the epochs by eye; returns their folder."""
    folder = contact_sheets_folder(run)
    for epoch, _ in _grid_targets(run):
        if (loaded := load_grid(run.grid_folder(epoch), None)) is None:
            continue
        title = f"{run.name} {'base model' if epoch is None else f'epoch {epoch}'}"
        with atomic_output(folder / f"{run.grid_folder(epoch).name}.png") as tmp:
            contact_sheet(loaded[0], spec, title, cell=128).save(tmp, format="PNG")
    return folder


def strength_filename(name: str, epoch: int, strength: float, index: int, seed: int) -> str:
    """`<name>_e000003_w0.8_00_<seed>.png`: the epoch and the LoRA weight it was rendered at."""
    return f"{name}_e{epoch:06d}_w{strength:g}_{index:02d}_{seed}.png"


def render_strengths(
    renderer: GridRenderer,
    spec: SampleSpec,
    lora: LoraFile,
    epoch: int,
    strengths: Sequence[float],
    folder: Path,
    name: str,
) -> tuple[list[Path], list[list[Image.Image]]]:
    """The chosen LoRA at each strength, every prompt and seed, saved in `folder` (`txt2img-images/`).

    Returns the paths and the rows (prompt x strength) for a contact sheet.
    """
    paths, rows = [], []
    for strength in strengths:
        grid = renderer.grid(spec, lora, strength)
        for index, (prompt, row) in enumerate(zip(spec.prompts, grid, strict=True)):
            for seed, image in zip(prompt.seeds, row, strict=True):
                path = Path(folder) / strength_filename(name, epoch, strength, index, seed)
                with atomic_output(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(path)
        rows.extend(grid)
    return paths, rows
