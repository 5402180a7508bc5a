"""Epoch metrics from renders: one fixed grid per epoch and one for the base model, then the numbers.

`lora_core.selection` judges numbers; this module makes them. Every epoch
renders the same grid (the neutral portrait and a few recontextualisation and
style prompts with the token, and the class prompt without it) at the same
seeds, and so does the base model once, so any difference between two grids
is the LoRA's. Grids are kept on disk beside the epoch files, keyed by the
LoRA's bytes and the grid's settings, so selecting again, or after a resume,
renders only what is new.

Subject fidelity needs an embedding of "who or what is in the picture":

- a person: dlib's face-recognition descriptor (ResNet, 128-d), the model the
  dataset checks already use. It is offline, public domain, and built to say
  whether two faces are the same person, which is the question here; a
  general image embedding (CLIP, DINO) also rewards pose, light and clothes.
- an object or a style: the pooled image embedding of the BLIP vision encoder
  the pipeline already has for captions (no extra download).

Where an embedding finds nothing (no face in a render, as on the tiny random
models), the metric is reported unavailable, never 0.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_core.config import LoraConfig, Sampler
from lora_core.fs import JsonCache, atomic_output, atomic_write_bytes, atomic_write_text, sha256_file
from lora_core.layout import SubjectLayout
from lora_core.lora_io import LoraFile, LoraFileError, read_lora, read_metadata
from lora_core.models import BaseModel
from lora_core.precision import Precision, resolve_precision
from lora_core.sampling import SamplePrompt, SampleSpec, render
from lora_core.selection import EpochMetrics, burn_score, copy_distance, diversity, fidelity, leave_one_out_ceiling
from lora_core.settings import DEFAULT_CLASS_PROMPTS, SelectionSettings, SubjectType

__all__ = [
    "BlipEmbedder",
    "FaceEmbedder",
    "GridRenderer",
    "RunFiles",
    "SelectionError",
    "epoch_metrics",
    "find_run",
    "grid_key",
    "grids_intact",
    "load_grid",
    "measure_run",
    "metric_spec",
    "publish_choice",
    "render_grids",
    "render_strengths",
    "save_grid",
    "subject_embedder",
    "write_selection",
]

EPOCH_FILE = re.compile(r"(?P<name>.+)-(?P<epoch>\d{6})\.safetensors")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SelectionError(ValueError):
    """A run folder selection cannot work on; the message says what is missing."""


# --- The run: its epoch files and reference photos ----------------------------------------


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

    def grid_folder(self, epoch: int | None) -> Path:
        return self.grids / ("base" if epoch is None else f"epoch-{epoch:06d}")


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


# --- The grid -------------------------------------------------------------------------------


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


def save_grid(folder: Path, key: str, grid: list[list[Image.Image]], validation_loss: float | None) -> None:
    """Each image as `p00_s1.png`, then `grid.json` last: a grid counts only when its record is there."""
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
    record = {"key": key, "files": names, "validation_loss": validation_loss}
    atomic_write_text(folder / "grid.json", json.dumps(record))


def load_grid(folder: Path, key: str | None) -> tuple[list[list[Image.Image]], float | None] | None:
    """The grid saved under `folder` for `key` (None: whatever is there), or None when missing,
    damaged or made otherwise."""
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
    return grid, record["validation_loss"]


class GridRenderer:
    """The base model with one LoRA network on it: renders any epoch's grid, and measures its loss.

    With our subject folder the network is a `Trainer`'s, so the validation
    loss on the captioned training images comes with it; a kohya output folder
    alone gets renders only (its validation loss is reported unavailable).
    Either way it renders in the config's `mixed_precision`, as the trainer's
    samples are, with the VAE and the LoRA weights in fp32.
    """

    def __init__(
        self, base: BaseModel, config: LoraConfig, lora: LoraFile, layout: SubjectLayout | None, device: str | None
    ) -> None:
        from lora_core.network import LoraNetwork
        from lora_core.training import Trainer

        alpha = next(iter(lora.modules.values()))[2]
        self.base = base
        if layout is not None:
            fields = {"network_dim": lora.rank, "network_alpha": alpha, "train_text_encoder": True}
            config = LoraConfig.model_validate(config.model_dump() | fields)
            self.trainer: Trainer | None = Trainer(config, base, layout, device=device, show_progress=False)
            self.network = self.trainer.network
            self.precision: Precision = self.trainer.precision
        else:
            self.trainer = None
            self.precision = resolve_precision(config.mixed_precision, device)
            self.network = LoraNetwork(base, lora.rank, alpha, train_text_encoder=True)
            for component in base.components.values():
                component.to(self.precision.device, dtype=self.precision.dtype)
            base.vae.to(self.precision.device, dtype=torch.float32)
            for param in self.network.parameters():  # cast with their layers above; the update stays fp32
                param.data = param.data.float()

    def grid(self, spec: SampleSpec, lora: LoraFile | None, strength: float = 1.0) -> list[list[Image.Image]]:
        """`spec` rendered with `lora` at `strength` (None: the base model alone)."""
        self._apply(lora, strength)
        with self.trainer.models_on_device() if self.trainer else nullcontext():
            return render(self.base, spec, self.precision)

    def validation_loss(self, lora: LoraFile | None) -> float | None:
        if self.trainer is None:
            return None
        self._apply(lora, 1.0)
        return self.trainer.validation_loss()

    def _apply(self, lora: LoraFile | None, strength: float) -> None:
        if lora is None:
            self.network.clear()
        else:
            self.network.load(lora, strength)


# --- Embeddings -------------------------------------------------------------------------------

Embedder = Callable[[Sequence[Image.Image]], list[np.ndarray | None]]


class FaceEmbedder:
    """dlib's face descriptor of the largest face in each image (None where there is none)."""

    def __init__(self, models=None) -> None:
        from lora_core.faces import face_models

        self.models = models or face_models()
        self.name = "dlib face-identity descriptor (ResNet, 128-d)"
        self.identity = self.models.identity

    def __call__(self, images: Sequence[Image.Image]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for image in images:
            rgb = np.asarray(image.convert("RGB"))
            faces = self.models.detect(rgb)
            if not faces:
                out.append(None)
                continue
            face = max(faces, key=lambda f: f.width * f.height)
            out.append(self.models.descriptor(self.models.chip(rgb, face)))
        return out


class BlipEmbedder:
    """The pooled image embedding of the captioning model's BLIP vision encoder."""

    def __init__(self, spec: str, device: str | None = None) -> None:
        from lora_core.captioning import BlipCaptioner

        self.captioner = BlipCaptioner(spec, device)
        self.name = f"BLIP vision encoder of {spec} (pooled image embedding)"
        self.identity = self.captioner.identity

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[np.ndarray | None]:
        processor, model = self.captioner.load()
        pixels = processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        pooled = model.vision_model(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
        return list(pooled.float().cpu().numpy())


def cached_embeddings(
    embed: Embedder, images: Sequence[Image.Image], cache: JsonCache | None
) -> list[np.ndarray | None]:
    """`embed(images)`, each remembered by the image's pixels (`cache`), so a grid is embedded once."""
    keys = [hashlib.sha256(image.convert("RGB").tobytes() + repr(image.size).encode()).hexdigest() for image in images]
    entries = [cache.get(key) if cache is not None else None for key in keys]
    todo = [index for index, entry in enumerate(entries) if entry is None]
    if todo:
        for index, vector in zip(todo, embed([images[i] for i in todo]), strict=True):
            entries[index] = {"vector": None if vector is None else [float(v) for v in vector]}
            if cache is not None:
                cache.put(keys[index], entries[index])
    return [None if e["vector"] is None else np.asarray(e["vector"], dtype=np.float32) for e in entries]


# --- One epoch's numbers -------------------------------------------------------------------------


@dataclass
class Reference:
    """What every epoch is compared with: the photos, their embeddings, and the base model's grid."""

    photos: list[Image.Image]
    photo_embeddings: np.ndarray | None  # None: fewer than two photos gave an embedding
    base_grid: list[list[Image.Image]]
    base_class_embeddings: list[np.ndarray | None]
    notes: list[str] = field(default_factory=list)


def _centroid_similarity(vectors: list[np.ndarray | None], photos: np.ndarray) -> float | None:
    found = [v for v in vectors if v is not None]
    if not found:
        return None
    unit = np.stack(found) / np.linalg.norm(np.stack(found), axis=1, keepdims=True)
    centroid = (photos / np.linalg.norm(photos, axis=1, keepdims=True)).mean(axis=0)
    return float(np.mean(unit @ (centroid / np.linalg.norm(centroid))))


def epoch_metrics(
    epoch: int,
    grid: list[list[Image.Image]],
    validation_loss: float | None,
    reference: Reference,
    embeddings: list[list[np.ndarray | None]] | None,
) -> EpochMetrics:
    """One epoch's row. `grid[-1]` is the class prompt; `embeddings` match `grid` (None: no embedder).

    diversity: per token prompt, the spread across seeds over the base model's
    spread at the same prompt and seeds, averaged. burn: `burn_score` of each
    token-prompt render against the base render at the same prompt and seed,
    averaged. preservation: how much closer the class-prompt renders come to
    the photos' centroid than the base model's did, in units of the ceiling.
    """
    token_rows, base_rows = grid[:-1], reference.base_grid[:-1]
    ratios = []
    for row, base_row in zip(token_rows, base_rows, strict=True):
        if len(row) >= 2 and (spread := diversity(base_row)) > 0:
            ratios.append(diversity(row) / spread)
    burns = [
        burn_score(image, base)
        for row, base_row in zip(token_rows, base_rows, strict=True)
        for image, base in zip(row, base_row, strict=True)
    ]
    samples = [image for row in token_rows for image in row]
    copy = copy_distance(samples, reference.photos) if reference.photos else None
    fid = preservation = None
    photos = reference.photo_embeddings
    if embeddings is not None and photos is not None:
        found = np.asarray([v for row in embeddings[:-1] for v in row if v is not None])
        if len(found):
            fid = fidelity(found, photos)
        ceiling = leave_one_out_ceiling(photos)
        now = _centroid_similarity(embeddings[-1], photos)
        before = _centroid_similarity(reference.base_class_embeddings, photos)
        if now is not None and before is not None:
            preservation = (now - before) / ceiling
    return EpochMetrics(
        epoch=epoch,
        validation_loss=validation_loss,
        fidelity=fid,
        copy_distance=copy,
        diversity=float(np.mean(ratios)) if ratios else None,
        preservation=preservation,
        burn=float(np.mean(burns)) if burns else None,
    )


# --- A whole run ----------------------------------------------------------------------------------


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
        save_grid(folder, key, grid, renderer.validation_loss(lora))
        if on_grid is not None:
            on_grid(epoch, grid)
        rendered.append(epoch or 0)
    return rendered


def _small(path: Path, side: int = 768) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.thumbnail((side, side))
    return image


def subject_embedder(config: LoraConfig) -> tuple[FaceEmbedder | BlipEmbedder | None, str]:
    """The embedding fidelity is measured with (face identity for a person, BLIP's encoder otherwise),
    or None and why, when its model cannot be loaded (fidelity is then reported unavailable)."""
    from lora_core.captioning import CaptionModelError
    from lora_core.faces import FaceModelError

    try:
        if config.subject_type == SubjectType.person:
            return FaceEmbedder(), ""
        embed = BlipEmbedder(config.captioning.model)
        embed.captioner.load()
        return embed, ""
    except (FaceModelError, CaptionModelError) as err:
        return None, f"no subject embedding ({err}): fidelity and preservation unavailable"


def write_selection(run: RunFiles, record: dict) -> None:
    """`selection.json`, atomically."""
    atomic_write_text(run.selection_json, json.dumps(record, indent=2))


def measure_run(
    run: RunFiles, spec: SampleSpec, base_identity: str, embed: FaceEmbedder | BlipEmbedder | None
) -> tuple[list[EpochMetrics], list[str]]:
    """Every epoch's row from the grids on disk (render them first), and notes on what was unavailable."""
    notes: list[str] = []
    embed_name = embed.name if embed is not None else "none"

    def grid_of(epoch: int | None, path: Path | None) -> tuple[list[list[Image.Image]], float | None]:
        loaded = load_grid(run.grid_folder(epoch), grid_key(spec, base_identity, sha256_file(path) if path else None))
        if loaded is None:
            raise SelectionError(f"{run.grid_folder(epoch)}: the grid is missing; render the grids first")
        return loaded

    base_grid, _ = grid_of(None, None)
    photos = [_small(path) for path in run.photos]
    if not photos:
        notes.append("no reference photos: fidelity, preservation and copies cannot be measured")
    cache = JsonCache(run.grids / ".embeddings", f"{embed_name}:{embed.identity}") if embed is not None else None
    photo_vectors = None
    base_class: list[np.ndarray | None] = []
    if embed is not None and photos:
        found = [v for v in cached_embeddings(embed, photos, cache) if v is not None]
        if len(found) >= 2:
            photo_vectors = np.stack(found)
            base_class = cached_embeddings(embed, base_grid[-1], cache)
        else:
            notes.append(f"{embed_name}: found in {len(found)} of {len(photos)} photos; fidelity needs two")
    reference = Reference(photos, photo_vectors, base_grid, base_class)
    series, seen, total = [], 0, 0
    for epoch, path in run.epochs.items():
        grid, loss = grid_of(epoch, path)
        vectors = None
        if photo_vectors is not None and embed is not None:
            vectors = [cached_embeddings(embed, row, cache) for row in grid]
            seen += sum(v is not None for row in vectors[:-1] for v in row)
            total += sum(len(row) for row in vectors[:-1])
        series.append(epoch_metrics(epoch, grid, loss, reference, vectors))
    if photo_vectors is not None and total and seen == 0:
        notes.append(f"{embed_name}: nothing found in any of the {total} token renders, so fidelity is unavailable")
    elif photo_vectors is not None and total:
        notes.append(f"{embed_name}: found in {seen} of {total} token renders")
    return series, notes


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
