"""Epoch metrics: the numbers `lora_core.evaluation.selection` judges, measured from the grids and the photos.

Each is defined in `lora_core.evaluation.selection`'s docstring. The image metrics
(diversity, copy distance, burn) need no model; fidelity and preservation
compare subject embeddings (`lora_core.evaluation.embedders`) of the renders with the
training photos'. `measure_run` reads the grids `lora_core.evaluation.metric_grids`
rendered, so measuring never loads the base model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from lora_core.dataset.crop import blockiness, sharpness
from lora_core.evaluation.embedders import BlipEmbedder, FaceEmbedder, cached_embeddings
from lora_core.evaluation.epoch_files import RunFiles, SelectionError
from lora_core.evaluation.metric_grids import grid_key, load_grid
from lora_core.evaluation.selection import EpochMetrics
from lora_core.foundation.fs import JsonCache, sha256_file
from lora_core.training.sampling import SampleSpec

__all__ = [
    "Reference",
    "burn_score",
    "copy_distance",
    "diversity",
    "epoch_metrics",
    "fidelity",
    "leave_one_out_ceiling",
    "measure_run",
]


# --- Image metrics ------------------------------------------------------------------


def _grey_small(image: Image.Image, side: int = 128) -> np.ndarray:
    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64)


def diversity(images: list[Image.Image]) -> float:
    """Mean pairwise distance between renders of one prompt at different seeds (0: all identical).

    Distance: root-mean-square difference of the 128 px grey images, in units
    of the grey scale (0-1), so it needs no model and reads the same on any.
    """
    if len(images) < 2:
        raise ValueError("diversity needs at least two images")
    grey = [_grey_small(image) / 255.0 for image in images]
    return float(np.mean([np.sqrt(np.mean((a - b) ** 2)) for a, b in itertools.combinations(grey, 2)]))


def copy_distance(samples: list[Image.Image], photos: list[Image.Image]) -> int:
    """The smallest perceptual-hash distance (of 64 bits) between any sample and any training photo.

    Ingest calls two photos the same at 6 or less; a sample that close to a
    training photo is a copy of it, not a new picture of the subject.
    """
    photo_hashes = [imagehash.phash(photo) for photo in photos]
    return int(min(imagehash.phash(sample) - known for sample in samples for known in photo_hashes))


def burn_score(sample: Image.Image, base: Image.Image) -> float:
    """How much more "cooked" `sample` looks than the base model's render at the same seed (0: no worse).

    The sum of four increases over the base render, each in its own unit:
    saturation (mean HSV S, 0-1), clipped pixels (share at 0 or 255), lost
    fine texture (1 - Laplacian-variance ratio, when lower), and JPEG-like
    blockiness (ratio - 1, when higher). Only increases count, so a sample that
    is cleaner than the base scores 0, not below.
    """

    def parts(image: Image.Image) -> tuple[float, float, float, float]:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        hsv = np.asarray(image.convert("HSV"), dtype=np.float64)
        clipped = float(np.mean((rgb <= 0) | (rgb >= 255)))
        grey = np.asarray(image.convert("L"), dtype=np.float64)
        return float(hsv[..., 1].mean() / 255.0), clipped, sharpness(grey), blockiness(grey)

    s_sat, s_clip, s_sharp, s_block = parts(sample)
    b_sat, b_clip, b_sharp, b_block = parts(base)
    texture_loss = max(0.0, 1.0 - s_sharp / b_sharp) if b_sharp > 0 else 0.0
    return (
        max(0.0, s_sat - b_sat)
        + max(0.0, s_clip - b_clip)
        + texture_loss
        + max(0.0, (s_block - 1.0) - max(0.0, b_block - 1.0))
    )


def leave_one_out_ceiling(photo_embeddings: np.ndarray) -> float:
    """How alike the training photos are to each other: mean cosine of each to the centroid of the others."""
    if len(photo_embeddings) < 2:
        raise ValueError("the ceiling needs at least two photos")
    unit = photo_embeddings / np.linalg.norm(photo_embeddings, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    scores = []
    for vector in unit:
        rest = total - vector
        scores.append(float(vector @ rest / np.linalg.norm(rest)))
    return float(np.mean(scores))


def fidelity(sample_embeddings: np.ndarray, photo_embeddings: np.ndarray) -> float:
    """Mean cosine of the samples to the photos' centroid, over the leave-one-out ceiling.

    1.0: the samples are as alike to the photos as the photos are to each other.
    """
    unit = sample_embeddings / np.linalg.norm(sample_embeddings, axis=1, keepdims=True)
    photos = photo_embeddings / np.linalg.norm(photo_embeddings, axis=1, keepdims=True)
    centroid = photos.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    return float(np.mean(unit @ centroid) / leave_one_out_ceiling(photo_embeddings))


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
    losses: dict[str, float | None],
    reference: Reference,
    embeddings: list[list[np.ndarray | None]] | None,
) -> EpochMetrics:
    """One epoch's row. `grid[-1]` is the class prompt; `embeddings` match `grid` (None: no embedder);
    `losses`: the grid's fixed losses (`metric_grids.LOSSES`, missing or None where unmeasured).

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
        training_loss=losses.get("training_loss"),
        heldout_loss=losses.get("heldout_loss"),
        fidelity=fid,
        copy_distance=copy,
        diversity=float(np.mean(ratios)) if ratios else None,
        preservation=preservation,
        burn=float(np.mean(burns)) if burns else None,
    )


# --- A whole run ----------------------------------------------------------------------------------


def _small(path: Path, side: int = 768) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.thumbnail((side, side))
    return image


def measure_run(
    run: RunFiles, spec: SampleSpec, base_identity: str, embed: FaceEmbedder | BlipEmbedder | None
) -> tuple[list[EpochMetrics], list[str]]:
    """Every epoch's row from the grids on disk (render them first), and notes on what was unavailable."""
    notes: list[str] = []
    embed_name = embed.name if embed is not None else "none"

    def grid_of(epoch: int | None, path: Path | None) -> tuple[list[list[Image.Image]], dict[str, float | None]]:
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
        grid, losses = grid_of(epoch, path)
        vectors = None
        if photo_vectors is not None and embed is not None:
            vectors = [cached_embeddings(embed, row, cache) for row in grid]
            seen += sum(v is not None for row in vectors[:-1] for v in row)
            total += sum(len(row) for row in vectors[:-1])
        series.append(epoch_metrics(epoch, grid, losses, reference, vectors))
    if photo_vectors is not None and total and seen == 0:
        notes.append(f"{embed_name}: no face in any of the {total} token renders, so no likeness is measured")
    elif photo_vectors is not None and total:
        notes.append(f"{embed_name}: found in {seen} of {total} token renders")
    return series, notes
