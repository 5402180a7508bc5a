"""The training data: images with captions and repeats, an epoch's batches, and their latents.

Batches never mix buckets (as kohya's). Every random choice of an epoch (its
order, shuffled tags, flips) is seeded by the run's seed and the epoch, so a
resumed run sees exactly what an unbroken one would have seen. With
`validation_split` some images are held out (`split_items`): never trained on,
only measured, so their loss can show what the training images' cannot.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save as save_bytes

from lora_core.dataset.buckets import BucketAssignment, apply_bucket, read_buckets
from lora_core.dataset.caption_text import read_caption
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS, UserError
from lora_core.foundation.fs import atomic_write_bytes, ensure_inside
from lora_core.foundation.layout import SubjectLayout

__all__ = [
    "MIN_TRAINING_IMAGES",
    "Latents",
    "SplitError",
    "TrainItem",
    "epoch_batches",
    "epoch_seed",
    "shuffle_tags",
    "split_items",
    "training_items",
]

# A held-out split must leave at least this many images to train on.
MIN_TRAINING_IMAGES = 2


class SplitError(UserError, ValueError):
    """A `validation_split` that would leave too few images to train on."""


@dataclass(frozen=True)
class TrainItem:
    """One training image: its bucket cut, its caption, and how often an epoch shows it."""

    assignment: BucketAssignment
    caption: str
    repeats: int


def training_items(layout: SubjectLayout, caption_extension: str = ".txt") -> list[TrainItem]:
    """The images of `buckets.csv` with their captions; repeats from the folder name, as kohya reads them."""
    items = []
    for assignment in read_buckets(layout.buckets_csv):
        image = ensure_inside(layout.root, layout.root / assignment.image)
        caption_path = image.with_suffix(caption_extension)
        if not caption_path.is_file():
            raise FileNotFoundError(f"{caption_path}: no caption; run the captions stage first")
        head = image.parent.name.split("_", 1)[0]
        items.append(TrainItem(assignment, read_caption(caption_path)[0], int(head) if head.isdigit() else 1))
    if not items:
        raise ValueError(f"{layout.buckets_csv}: no images to train on")
    return items


def split_items(items: list[TrainItem], split: float, seed: int) -> tuple[list[TrainItem], list[TrainItem]]:
    """kohya's `validation_split`, by image: (the images trained on, the images held out), each in `items`' order.

    Which images are held out depends only on their names and `seed` (sd-scripts'
    `validation_seed`, else the training seed), so every epoch, a resumed run and
    a later selection hold out the same ones. A split above 0 holds out at least
    one image (sd-scripts may round it to none); a split leaving fewer than
    `MIN_TRAINING_IMAGES` to train on is refused.
    """
    if split <= 0:
        return list(items), []
    order = sorted(range(len(items)), key=lambda i: items[i].assignment.image)
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(items) * split))])
    if len(items) - len(held) < MIN_TRAINING_IMAGES:
        raise SplitError(
            f"validation_split {split} holds out {len(held)} of {len(items)} images, leaving "
            f"{len(items) - len(held)} to train on (at least {MIN_TRAINING_IMAGES}): lower validation_split "
            "or add photos"
        )
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order, tag shuffles and flips."""
    return seed * 1000 + epoch


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: shuffle the comma-separated tags after the first `keep_tokens`."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


def epoch_batches(items: list[TrainItem], batch_size: int, seed: int) -> list[list[int]]:
    """Indices of one epoch's batches: each image `repeats` times, batches within one bucket, shuffled."""
    rng = random.Random(seed)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.assignment.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


class Latents:
    """Each image's VAE latents, scaled: cached once (`cache_latents`), or encoded at every step.

    Cached latents are the distribution's mean, encoded in fp32 (never an fp16
    VAE); with `flip_aug` the mirrored image is cached too. With
    `cache_latents_to_disk` each is also kept beside its image as
    `<image>.latents.safetensors` and reused while the image, its bucket and the
    VAE are the same. Uncached, the VAE stays on the device and each step
    encodes a sample of the distribution, as sd-scripts does.
    """

    def __init__(
        self,
        items: list[TrainItem],
        layout: SubjectLayout,
        vae: torch.nn.Module,
        vae_identity: str,
        device: torch.device,
        *,
        cache: bool,
        to_disk: bool,
        flip: bool,
    ) -> None:
        self.items, self.layout, self.vae, self.device = items, layout, vae, device
        self.cache, self.to_disk, self.flip = cache or to_disk, to_disk, flip
        self.vae_identity = hashlib.sha256(
            (json.dumps(dict(vae.config), sort_keys=True, default=str) + vae_identity).encode()
        ).hexdigest()
        self.cached: list[dict[bool, torch.Tensor]] = []
        if self.cache:
            self.cached = [self._cached(index) for index in range(len(items))]

    def batch(self, indices: list[int], flips: list[bool], generator: torch.Generator) -> torch.Tensor:
        """The latents of a batch on the device, each image mirrored where `flips` says."""
        if self.cache:
            stacked = torch.stack([self.cached[i][f] for i, f in zip(indices, flips, strict=True)])
            if self.device.type == "cuda":  # page-locked, so the copy overlaps the step instead of waiting
                stacked = stacked.pin_memory()
            return stacked.to(self.device, non_blocking=True)
        pixels = torch.stack([self._pixels(i, f) for i, f in zip(indices, flips, strict=True)])
        return self._encode(pixels, sample=generator)

    # -- encoding --

    def _pixels(self, index: int, flipped: bool) -> torch.Tensor:
        with Image.open(self.layout.root / self.items[index].assignment.image) as image:
            picture = apply_bucket(image.convert("RGB"), self.items[index].assignment)
        if flipped:
            picture = ImageOps.mirror(picture)
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def _encode(self, pixels: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
        """Scaled (and shifted) latents; the mean, or a draw with `sample`'s generator (on the CPU)."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            dist = vae.encode(pixels.to(self.device, dtype)).latent_dist
            latents = dist.mean
            if sample is not None:
                noise = torch.randn(dist.std.shape, generator=sample).to(dist.std)
                latents = dist.mean + dist.std * noise
        # FLUX.1's autoencoder also shifts its latents (`shift_factor`); SD's have none.
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def _cached(self, index: int) -> dict[bool, torch.Tensor]:
        """`{flipped: latents}` of one image, from its disk cache when that is still this image's."""
        from safetensors import safe_open

        image_path = self.layout.root / self.items[index].assignment.image
        cache = image_path.with_name(image_path.stem + ".latents.safetensors")
        key = {
            "image": hashlib.sha256(image_path.read_bytes()).hexdigest(),
            "vae": self.vae_identity,
            "bucket": json.dumps(asdict(self.items[index].assignment), sort_keys=True),
        }
        wanted = {"latents": False} | ({"latents_flipped": True} if self.flip else {})
        if self.to_disk and cache.is_file():
            try:
                with safe_open(str(cache), framework="pt") as handle:
                    if handle.metadata() == key and set(wanted) <= set(handle.keys()):
                        return {flipped: handle.get_tensor(name) for name, flipped in wanted.items()}
            except DAMAGED_FILE_ERRORS:
                pass  # damaged or foreign: encode again
        out = {
            flipped: self._encode(self._pixels(index, flipped)[None])[0].cpu().contiguous()
            for flipped in wanted.values()
        }
        if self.to_disk:
            atomic_write_bytes(cache, save_bytes({name: out[flipped] for name, flipped in wanted.items()}, key))
        return out
