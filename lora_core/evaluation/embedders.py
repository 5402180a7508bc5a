"""Subject embeddings: "who or what is in the picture", as a vector to compare renders with photos.

- a person: dlib's face-recognition descriptor (ResNet, 128-d), the model the
  dataset checks already use. It is offline, public domain, and built to say
  whether two faces are the same person, which is the question here; a
  general image embedding (CLIP, DINO) also rewards pose, light and clothes.
- an object or a style: the pooled image embedding of the BLIP vision encoder
  the pipeline already has for captions (no extra download).

Where an embedding finds nothing (no face in a render, as on the tiny random
models), it is None, and the metric built on it is reported unavailable, never 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SubjectType
from lora_core.foundation.fs import JsonCache

__all__ = ["BlipEmbedder", "Embedder", "FaceEmbedder", "cached_embeddings", "subject_embedder"]

Embedder = Callable[[Sequence[Image.Image]], list[np.ndarray | None]]


class FaceEmbedder:
    """dlib's face descriptor of the largest face in each image (None where there is none)."""

    def __init__(self, models=None) -> None:
        from lora_core.checks.face_models import face_models

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
        from lora_core.dataset.blip import BlipCaptioner

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


def subject_embedder(config: LoraConfig) -> tuple[FaceEmbedder | BlipEmbedder | None, str]:
    """The embedding fidelity is measured with (face identity for a person, BLIP's encoder otherwise),
    or None and why, when its model cannot be loaded (fidelity is then reported unavailable)."""
    from lora_core.checks.face_models import FaceModelError
    from lora_core.dataset.blip import CaptionModelError

    try:
        if config.subject_type == SubjectType.person:
            return FaceEmbedder(), ""
        embed = BlipEmbedder(config.captioning.model)
        embed.captioner.load()
        return embed, ""
    except (FaceModelError, CaptionModelError) as err:
        return None, f"no subject embedding ({err}): fidelity and preservation unavailable"
