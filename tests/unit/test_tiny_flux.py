"""The builtin tiny FLUX.1: FLUX's real module tree and pipeline, built and run offline on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from lora_core.foundation.tiny_models import materialize

TINY_FLUX = "builtin:tiny-flux"


@pytest.fixture(scope="module")
def flux(builtin_models_home):
    """The tiny FLUX pipeline, loaded the way a real local copy is: from its folder, offline."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(materialize(TINY_FLUX), local_files_only=True)


def test_it_loads_with_flux_modules_and_the_flux_vae(flux):
    transformer = flux.transformer
    modules = dict(transformer.named_modules())
    for name in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.1.attn.to_add_out",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.attn.to_q",
        "time_text_embed.guidance_embedder.linear_1",
        "proj_out",
    ):
        assert name in modules, name
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 2
    # The text encoders feed the transformer: T5's states as context, CLIP's pooled output as the vector.
    assert transformer.config.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert transformer.config.pooled_projection_dim == flux.text_encoder.config.hidden_size
    assert transformer.config.in_channels == 4 * flux.vae.config.latent_channels  # 2x2 packing
    assert flux.vae.config.latent_channels == 16
    assert flux.vae.config.shift_factor == pytest.approx(0.1159)
    assert flux.vae.quant_conv is None and flux.vae.post_quant_conv is None
    assert flux.vae_scale_factor == 8
    assert flux.scheduler.config.use_dynamic_shifting and flux.scheduler.config.max_shift == pytest.approx(1.15)


def test_a_one_step_render_is_64_pixels_and_repeatable(flux):
    import torch

    def render(seed: int):
        return flux(
            "a portrait of a man in a suit",
            height=64,
            width=64,
            num_inference_steps=1,
            guidance_scale=3.5,
            max_sequence_length=64,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]

    first, again, other = render(0), render(0), render(1)
    assert first.size == (64, 64) and first.mode == "RGB"
    pixels = np.asarray(first)
    assert pixels.std() > 0  # an image, not a flat fill
    assert np.array_equal(pixels, np.asarray(again))
    assert not np.array_equal(pixels, np.asarray(other))  # the seed reaches the latents


def test_the_t5_tokenizer_round_trips_offline_and_pads(flux, tmp_path):
    from transformers import T5TokenizerFast

    tokenizer = flux.tokenizer_2
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    tokenizer.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path, local_files_only=True)

    prompt = "A portrait of Zoë, smiling"
    kwargs = {
        "padding": "max_length",
        "max_length": 64,
        "truncation": True,
        "return_length": False,
        "return_overflowing_tokens": False,
        "return_tensors": "pt",
    }
    ids = tokenizer(prompt, **kwargs).input_ids
    assert ids.tolist() == reloaded(prompt, **kwargs).input_ids.tolist()
    assert ids.shape == (1, 64)
    tokens = ids[0].tolist()
    length = tokens.index(1) + 1  # through </s>
    assert 1 < length < 64 and set(tokens[length:]) == {0}  # padded with <pad> after </s>
    assert 2 in tokens[:length]  # ë is not in the vocabulary
    assert tokenizer.convert_tokens_to_ids("▁portrait") in tokens  # a caption word is one token
    assert reloaded.decode(tokens, skip_special_tokens=True) == "A portrait of Zo, smiling"

    long = reloaded(" ".join(["portrait"] * 100), **kwargs).input_ids[0].tolist()
    assert len(long) == 64 and long[-1] == 1  # truncated, still ending in </s>
