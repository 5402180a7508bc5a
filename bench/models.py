"""What the training benches share: models built from configs, and a subject folder to train on.

Every model here is built from a config written out in this file, with seeded
random weights, so nothing is ever downloaded: speed and memory depend on the
shapes, not on the weights. The plain reference loop is `bench.bare_loop`, the
clocks and checks `bench.measure`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benches build every model from a config; never fetch one

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.photos import photo
from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import IngestSettings
from lora_core.dataset.blip import BlipCaptioner
from lora_core.dataset.buckets import BucketPlan, bucket_subject
from lora_core.dataset.captioning import caption_subject
from lora_core.dataset.ingest import ingest
from lora_core.families import FAMILIES
from lora_core.families.family import LoadedModel
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.tiny_models import sd_noise_scheduler

__all__ = ["ARCHITECTURES", "Architecture", "build_base", "fingerprint", "make_subject"]

# --- Architectures, written out (diffusers' and transformers' config keys) ----------------

# stable-diffusion-v1-5/unet/config.json
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stable-diffusion-xl-base-1.0/unet/config.json
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size numbers x 256 + bigG's 1280-wide pooled output
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "upcast_attention": False,
}

# openai/clip-vit-large-patch14 text model (SD1.5's encoder, SDXL's first).
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# laion/CLIP-ViT-bigG-14 text model (SDXL's second encoder, with its projection).
OPENCLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# The SD VAE (SD1.5's and SDXL's share the shape; SDXL's latents are scaled by 0.13025).
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# Small stand-ins: the same module trees, narrow (the smoke runs and the CPU bench's frozen parts).
TINY_VAE: dict[str, Any] = SD_VAE | {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8}
_TINY_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_SD15_UNET: dict[str, Any] = SD15_UNET | {
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
TINY_SDXL_UNET: dict[str, Any] = SDXL_UNET | {
    "block_out_channels": (32, 64, 64),
    "transformer_layers_per_block": (1, 1, 2),  # SDXL's 1/2/10 deep costs the smoke runs seconds of peft set-up
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64,  # both tiny encoders' 32-wide states side by side
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}


@dataclass(frozen=True)
class Architecture:
    """A base model's shape: UNet, text encoder(s) (SDXL's second has the projection) and VAE configs."""

    name: str
    family: str  # its name in lora_core.families.FAMILIES
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    vae: dict[str, Any]
    notes: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture("sd15", "sd15", SD15_UNET, (CLIP_L,), SD_VAE, "SD1.5 at full size"),
    "sdxl": Architecture(
        "sdxl", "sdxl", SDXL_UNET, (CLIP_L, OPENCLIP_BIGG), SD_VAE | {"sample_size": 1024, "scaling_factor": 0.13025}
    ),
    # The CPU bench: SD1.5's UNet at full width; a 2-layer 768-wide text encoder (its outputs are cached) and a
    # tiny VAE (it only encodes each image once).
    "sd15-mid": Architecture(
        "sd15-mid",
        "sd15",
        SD15_UNET,
        (
            _TINY_TEXT
            | {"hidden_size": 768, "intermediate_size": 256, "num_attention_heads": 12, "projection_dim": 768},
        ),
        TINY_VAE,
        "SD1.5 UNet at full width, tiny VAE and text encoder",
    ),
    "sd15-tiny": Architecture("sd15-tiny", "sd15", TINY_SD15_UNET, (_TINY_TEXT,), TINY_VAE, "SD1.5's tree, 32 wide"),
    "sdxl-tiny": Architecture(
        "sdxl-tiny", "sdxl", TINY_SDXL_UNET, (_TINY_TEXT, _TINY_TEXT), TINY_VAE, "SDXL's blocks, 32-64 wide, shallow"
    ),
}


def build_unet(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The UNet alone, seeded: the same seed gives the same weights (the reference loop's fresh copy)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**arch.unet)


def build_base(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """A `LoadedModel` of `arch` with seeded random weights, built on `device` (a GPU builds in seconds).

    The tokenizer is the project's offline CLIP tokenizer (one token per
    character); token ids stay below 514, so a full 49408-row embedding works.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_core.foundation.tiny_models import _clip_tokenizer

    unet = build_unet(arch, seed, device)
    tokenizers, encoders = [], []
    for index, text in enumerate(arch.text_encoders):
        tokenizer = _clip_tokenizer()
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = CLIPTextConfig(**text, **ids, pad_token_id=tokenizer.eos_token_id)
        with_projection = index == 1  # SDXL's second encoder
        torch.manual_seed(seed + 1 + index)
        with torch.device(device):
            encoders.append((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))
        tokenizers.append(tokenizer)
    torch.manual_seed(seed + 10)
    with torch.device(device):
        vae = AutoencoderKL(**arch.vae)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    return LoadedModel(
        spec=f"bench:{arch.name}",
        family=FAMILIES[arch.family],
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=sd_noise_scheduler(),
    )


def fingerprint(module: torch.nn.Module) -> float:
    """A float64 sum of every weight: equal for two copies of the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


# --- A subject folder ------------------------------------------------------------------------------


def make_subject(
    root: Path, config: LoraConfig, side: int, count: int, repeats: int, token: str = "b3nch"
) -> SubjectLayout:
    """`count` square photos of `side` px with their own captions, ingested, bucketed and captioned.

    An epoch is `count * repeats / batch` steps; the photos share one bucket.
    Photos smaller than the config's resolution get a bucket of their own size
    (`bucket_no_upscale`): that is how the CPU bench trains below the config's
    256 px floor. BLIP is never loaded: every photo brings its caption.
    """
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        photo((side, side), 70 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man in a suit, photo {i}")
    layout = SubjectLayout(root / "work", token)
    settings = IngestSettings(min_short_side=min(256, side), min_images=1, near_duplicate_distance=0)
    ingest(photos, layout, settings, num_repeats=repeats, show_progress=False)
    bucket_subject(layout, BucketPlan.from_config(config), config.train_batch_size)
    no_blip = "bench:no-blip"  # never loaded (all captions are the user's); names the captions' source
    caption_subject(
        layout,
        config.captioning.model_copy(update={"model": no_blip}),
        captioner=BlipCaptioner(no_blip),
        show_progress=False,
    )
    return layout
