"""Tiny, randomly initialised models built from configs: the real code paths, offline.

There is no model hub on CI or in the demo, and nothing may download weights at
run or test time. A `builtin:<name>` model spec names one of these: it is built
once (seeded, so always the same weights) into a local folder with
`save_pretrained`, then loaded back through exactly the code that loads a real
local copy. Its outputs are nonsense words, but every stage runs for real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_PREFIX", "builtin_home", "is_builtin", "materialize"]

BUILTIN_PREFIX = "builtin:"
# Bump when a builder changes, so caches keyed on the model spec are invalidated.
_VERSION = "v2"
_BUILT = ".built"  # written last: a folder without it is not a finished model

# Words a captioner of portraits would use, so tiny-BLIP output reads like a caption.
_CAPTION_WORDS = """
    a an the of in on at with and his her their is are man woman person people young old
    picture photo portrait close up standing sitting smiling looking camera wearing suit tie shirt
    jacket dress hat glasses hair beard face hand hands holding remote control microphone phone
    front flag desk office room window wall table chair podium stage crowd outside inside building
    white black blue red green dark light gray brown background day night sunny
    talking speaking walking waving pointing reading laughing serious
"""


def builtin_home() -> Path:
    """Where builtin models are built: `$SUBJECT_LORA_HOME/builtin`, else `~/.cache/subject-lora/builtin`."""
    root = os.environ.get("SUBJECT_LORA_HOME")
    base = Path(root) if root else Path.home() / ".cache" / "subject-lora"
    return base / "builtin"


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def materialize(spec: str, home: Path | None = None) -> Path:
    """Build the builtin model `spec` (e.g. ``builtin:tiny-blip``) if needed; return its folder.

    Built into a temporary folder, marked finished, and renamed into place, so
    a crash never leaves half a model that later loads.
    """
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin model {spec!r}; builtin models: {', '.join(_specs())}")
    home = Path(home) if home is not None else builtin_home()
    target = home / f"{name}-{_VERSION}"
    if (target / _BUILT).is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=home))
    try:
        _BUILDERS[name](staging)
        (staging / _BUILT).write_text(spec + "\n")
        if target.exists() and not (target / _BUILT).is_file():
            shutil.rmtree(target)  # an unfinished build from an older version of this code
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / _BUILT).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _specs() -> list[str]:
    return [BUILTIN_PREFIX + name for name in _BUILDERS]


def _build_tiny_blip(folder: Path) -> None:
    """BLIP captioning with a 32-wide vision and text model and a 140-word tokenizer."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(specials + _CAPTION_WORDS.split() + [",", "."]))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            # BLIP's default 1e-10 makes every image look alike; captions should differ.
            "initializer_range": 0.5,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
            "initializer_range": 0.5,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    # Random weights never choose to stop; make [SEP] likely so captions end near
    # min_length, as a real BLIP's do, instead of running to max_length.
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab["[SEP]"]] = 12.0
    model.save_pretrained(folder)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _clip_tokenizer():
    """A CLIP BPE tokenizer over single bytes, no merges: every character is a token.

    Real CLIP vocabularies come from the hub; this one is made here, with the
    same special tokens, `</w>` word ends and byte-level alphabet, so the real
    tokenizer class and truncation to 77 tokens run unchanged.
    """
    from transformers import CLIPTokenizer

    # GPT-2's printable stand-ins for the 256 bytes, as CLIP's BPE uses them.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _clip_text_config(layers: int, vocab_size: int, **extra: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **extra,
    )


def _vae(latent_channels: int = 4, **extra: Any):
    from diffusers import AutoencoderKL

    # Four blocks as in SD's and FLUX's VAEs, so latents are 1/8 of the image (SD: 4 channels deep).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def sd_noise_scheduler():
    """Stable Diffusion's training noise schedule (SD1.5's and SDXL's scheduler_config.json)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )


def _build_tiny_sd15(folder: Path) -> None:
    """SD1.5's module tree (4 down/up blocks, 16 transformers, a 12-layer CLIP), 32 channels wide."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_clip_text_config(12, len(tokenizer)))
    pipeline = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _build_tiny_sdxl(folder: Path) -> None:
    """SDXL's module tree (3 blocks with 1/2/10-deep transformers; CLIP-L 12 and bigG 32 layers), narrow."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,  # both text encoders' hidden states side by side, as in SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        norm_num_groups=8,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(12, len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(32, len(tokenizer), projection_dim=pooled_dim)),
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=sd_noise_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _t5_tokenizer():
    """A T5 Unigram tokenizer over the caption words and single characters; unknown characters are `<unk>`.

    Real T5 vocabularies come from the hub; this one is made here with T5's
    special ids (pad 0, eos 1, unk 2), `▁` word starts and 512-token limit, so
    the real tokenizer class pads, truncates and appends `</s>` unchanged. No
    sentinel `<extra_id_N>` tokens: only span-corruption pretraining uses them.
    """
    import string

    from transformers import T5TokenizerFast

    # Unigram log-probabilities: a whole word beats spelling it, so captions are a few tokens each.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -5.0) for word in dict.fromkeys(_CAPTION_WORDS.split())]
    vocab += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _build_tiny_flux(folder: Path) -> None:
    """FLUX.1-dev's module tree (double and single blocks, guidance embedding; CLIP-L 12 layers, T5, 16-channel VAE).

    Narrow: 2 heads of 8 (inner width 16), 2 double and 2 single blocks, a
    2-layer T5 32 wide. The VAE and scheduler configs are FLUX.1-dev's, so
    latent scaling, 2x2 packing and the resolution-dependent shift run as real.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    # T5 v1.1 (FLUX's T5-XXL): gated-GELU feed-forward, untied embeddings.
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder = CLIPTextModel(_clip_text_config(12, len(tokenizer)))  # FLUX uses its pooled output only
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim, as (16, 56, 56) does to 128
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        # FLUX's ae: 16 channels, shifted and scaled, no quant convs.
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-blip": _build_tiny_blip,
    "tiny-sd15": _build_tiny_sd15,
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-flux": _build_tiny_flux,
}
