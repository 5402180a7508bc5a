"""What the training benches share: models built from configs (the subject folder is `bench.subject`).

Every model here is built from a config written out in this file, with seeded
random weights, so nothing is ever downloaded: speed and memory depend on the
shapes, not on the weights. FLUX.1's transformer (12B parameters) is built on
the meta device and materialised block by block, so no device ever holds it
in fp32. The plain reference loop is `bench.bare_loop`, the clocks and checks
`bench.measure`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benches build every model from a config; never fetch one

from dataclasses import dataclass
from typing import Any

import torch

from lora_core.families import FAMILIES
from lora_core.families.family import LoadedModel
from lora_core.foundation.tiny_models import sd_noise_scheduler

__all__ = ["ARCHITECTURES", "Architecture", "build_base", "build_transformer", "fingerprint"]

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

# black-forest-labs/FLUX.1-dev/transformer/config.json (12B parameters: 19 double, 38 single blocks, 3072 wide).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's width
    "pooled_projection_dim": 768,  # CLIP-L's pooled output
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# FLUX.1-dev/scheduler/scheduler_config.json.
FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
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
# FLUX's autoencoder, narrow: 16 channels, shifted and scaled, no quant convs (latents are 1/8 of the image).
TINY_FLUX_VAE: dict[str, Any] = TINY_VAE | {
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# T5 v1.1 (FLUX's T5-XXL) narrow and shallow; its vocabulary is the offline tokenizer's. Only its output's width
# (the transformer's joint_attention_dim) matters to the step: its states are cached.
_TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# CLIP-L's width, 2 layers: the CPU bench's text encoder (its outputs are cached).
_MID_CLIP_L = _TINY_TEXT | {
    "hidden_size": 768,
    "intermediate_size": 256,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
# FLUX.1's encoders at the widths its transformer reads (CLIP-L's pooled 768, T5-XXL's 4096), T5 one layer deep.
_FLUX_TEXT = (_MID_CLIP_L, _TINY_T5 | {"d_model": 4096, "num_layers": 1})
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
# FLUX.1-dev's transformer, narrow and shallow: the CPU bench's (width 512: 4 heads of FLUX's own 128, its rope
# axes; 2 double and 4 single blocks, 39M parameters) and the smoke runs' (width 64, 2 + 2 blocks).
MID_FLUX_TRANSFORMER: dict[str, Any] = FLUX_DEV_TRANSFORMER | {
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 4,
}
TINY_FLUX_TRANSFORMER: dict[str, Any] = FLUX_DEV_TRANSFORMER | {
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,  # 64 wide: bitsandbytes' NF4 blocks are 64 inputs (its CPU path needs a whole one)
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}


@dataclass(frozen=True)
class Architecture:
    """A base model's shape: denoiser, text encoder(s) and VAE configs.

    SD: a UNet, CLIP encoder(s) (SDXL's second has the projection). FLUX.1: a
    transformer (`denoiser`), CLIP-L (pooled output) then T5 (a `T5Config`).
    """

    name: str
    family: str  # its name in lora_core.families.FAMILIES
    unet: dict[str, Any]  # the denoiser's config
    text_encoders: tuple[dict[str, Any], ...]
    vae: dict[str, Any]
    notes: str = ""
    denoiser: str = "UNet2DConditionModel"  # the diffusers class `unet` configures


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
        (_MID_CLIP_L,),
        TINY_VAE,
        "SD1.5 UNet at full width, tiny VAE and text encoder",
    ),
    "sd15-tiny": Architecture("sd15-tiny", "sd15", TINY_SD15_UNET, (_TINY_TEXT,), TINY_VAE, "SD1.5's tree, 32 wide"),
    # SDXL's UNet at full width, its deepest level 2 transformer layers deep (not 10); narrow encoders of
    # SDXL's widths (768 + 1280, bigG's pooled 1280).
    "sdxl-mid": Architecture(
        "sdxl-mid",
        "sdxl",
        SDXL_UNET | {"transformer_layers_per_block": (1, 2, 2)},
        (_MID_CLIP_L, _MID_CLIP_L | {"hidden_size": 1280, "num_attention_heads": 20, "projection_dim": 1280}),
        TINY_VAE | {"scaling_factor": 0.13025},
        "SDXL UNet at full width with 1/2/2 transformer layers, tiny VAE and text encoders",
    ),
    "sdxl-tiny": Architecture(
        "sdxl-tiny", "sdxl", TINY_SDXL_UNET, (_TINY_TEXT, _TINY_TEXT), TINY_VAE, "SDXL's blocks, 32-64 wide, shallow"
    ),
    # The GPU bench: the transformer at full size; the encoders' outputs and the latents are cached, so narrow
    # encoders of the right widths and a narrow VAE with FLUX's latent space do.
    "flux": Architecture(
        "flux",
        "flux",
        FLUX_DEV_TRANSFORMER,
        _FLUX_TEXT,
        TINY_FLUX_VAE,
        "FLUX.1-dev transformer at full size, narrow text encoders and VAE",
        "FluxTransformer2DModel",
    ),
    "flux-mid": Architecture(
        "flux-mid",
        "flux",
        MID_FLUX_TRANSFORMER,
        _FLUX_TEXT,
        TINY_FLUX_VAE,
        "FLUX.1-dev's transformer 512 wide, 2 double + 4 single blocks; narrow text encoders and VAE",
        "FluxTransformer2DModel",
    ),
    "flux-tiny": Architecture(
        "flux-tiny",
        "flux",
        TINY_FLUX_TRANSFORMER,
        (_TINY_TEXT, _TINY_T5),
        TINY_FLUX_VAE,
        "FLUX.1's blocks, 64 wide, shallow",
        "FluxTransformer2DModel",
    ),
}


def build_unet(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The denoiser alone, seeded: the same seed gives the same weights (the reference loop's fresh copy)."""
    if arch.denoiser == "FluxTransformer2DModel":
        return build_transformer(arch, seed, device)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**arch.unet)


def build_transformer(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """FLUX's transformer, seeded: built on the meta device, each block then materialised on `device` (a GPU
    initialises 12B weights in seconds) and kept on the host, as a loaded model is until the trainer stores
    (fp8, NF4) and places it. Kept in fp32 when built on the CPU (the trainer casts, as for the UNets), in
    bf16 from a GPU: FLUX.1 is loaded in bf16, and no device ever holds the whole model in fp32 (48 GB)."""
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device("meta"):
        model = FluxTransformer2DModel(**arch.unet)
    if next(model.parameters(recurse=False), None) is not None or next(model.buffers(), None) is not None:
        raise RuntimeError("FluxTransformer2DModel has weights of its own or buffers: materialise them too")
    torch.manual_seed(seed)
    children = list(model.children())
    for piece in (m for child in children for m in (child if isinstance(child, torch.nn.ModuleList) else [child])):
        piece.to_empty(device=device)
        with torch.no_grad():
            for module in piece.modules():
                if next(module.parameters(recurse=False), None) is None:
                    continue
                if not hasattr(module, "reset_parameters"):  # uninitialised memory would go unnoticed
                    raise RuntimeError(f"{type(module).__name__} has weights but no reset_parameters")
                module.reset_parameters()  # the module's own default initialisation
        piece.to("cpu", dtype)
    return model


def build_base(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """A `LoadedModel` of `arch` with seeded random weights, built on `device` (a GPU builds in seconds).

    The tokenizer is the project's offline CLIP tokenizer (one token per
    character); token ids stay below 514, so a full 49408-row embedding works.
    FLUX.1's transformer is kept on the host (`build_transformer`); its T5
    tokenizer is the project's offline one.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_core.foundation.tiny_models import _clip_tokenizer

    flux = arch.denoiser == "FluxTransformer2DModel"
    unet = build_unet(arch, seed, device)
    tokenizers, encoders = [], []
    for index, text in enumerate(arch.text_encoders):
        torch.manual_seed(seed + 1 + index)
        if flux and index == 1:  # FLUX's second encoder is T5
            tokenizer, encoder = _t5(text, device)
        else:
            tokenizer = _clip_tokenizer()
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            config = CLIPTextConfig(**text, **ids, pad_token_id=tokenizer.eos_token_id)
            with_projection = index == 1 and not flux  # SDXL's second encoder
            with torch.device(device):
                encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
        encoders.append(encoder)
        tokenizers.append(tokenizer)
    torch.manual_seed(seed + 10)
    with torch.device(device):
        vae = AutoencoderKL(**arch.vae)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    for encoder in encoders:  # as `from_pretrained` leaves them: T5's dropout off (CLIP has none)
        encoder.eval()
    return LoadedModel(
        spec=f"bench:{arch.name}",
        family=FAMILIES[arch.family],
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=_flux_scheduler() if flux else sd_noise_scheduler(),
    )


def _t5(config: dict[str, Any], device: str | torch.device) -> tuple[Any, torch.nn.Module]:
    from transformers import T5Config, T5EncoderModel

    from lora_core.foundation.tiny_models import _t5_tokenizer

    tokenizer = _t5_tokenizer()
    with torch.device(device):
        return tokenizer, T5EncoderModel(T5Config(vocab_size=len(tokenizer), **config))


def _flux_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


def fingerprint(module: torch.nn.Module) -> float:
    """A float64 sum of every weight: equal for two copies of the same weights."""
    with torch.no_grad():  # summed in float64 without a float64 copy of each weight (FLUX's are 12B)
        return float(sum(p.detach().sum(dtype=torch.float64) for p in module.parameters()))
