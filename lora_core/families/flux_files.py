"""FLUX.1 from the single files ComfyUI and sd-scripts users have, with the configs of a diffusers folder.

Users keep FLUX.1 as `flux1-dev.safetensors` (the transformer in Black Forest
Labs' names, maybe under ComfyUI's `model.diffusion_model.`), `clip_l`,
`t5xxl_fp16` and `ae` files (sd-scripts' `--clip_l`, `--t5xxl`, `--ae`). None
carries its architecture, so every component is built from a FLUX.1
diffusers folder's config (`--base-model-config`) and filled from its file.

Only safetensors are read (a pickle may run code). Each file's tensors must
fit its component exactly: a missing, unexpected or misshapen tensor is an
error naming the file, never a silently random or skipped weight. Weights
load in float32 unless `dtype` (or `torch_dtype`) says otherwise (fp8 files are upcast).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core.foundation.errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from torch import nn
    from transformers import CLIPTextModel, T5EncoderModel

__all__ = [
    "DEFAULT_CONFIG",
    "PARTS",
    "FluxFileError",
    "bfl_to_diffusers",
    "load_ae",
    "load_clip_l",
    "load_pipeline",
    "load_t5xxl",
    "load_transformer",
]

# Where a BFL transformer file's configs come from when no folder is named (the hub's cache, offline).
DEFAULT_CONFIG = "black-forest-labs/FLUX.1-dev"
# sd-scripts' option for each part file -> the pipeline component it replaces.
PARTS = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2", "ae": "vae"}
COMFY_PREFIX = "model.diffusion_model."
_DESCRIBED = {
    "transformer": "FLUX.1's transformer (flux1-dev.safetensors)",
    "clip_l": "CLIP-L's text encoder (clip_l.safetensors)",
    "t5xxl": "T5-XXL's encoder (t5xxl_fp16.safetensors)",
    "ae": "FLUX.1's autoencoder (ae.safetensors)",
}
# from_pretrained's options that say where and how to find a config; the rest are not the configs' business.
_HUB_OPTIONS = ("local_files_only", "cache_dir", "revision", "token", "force_download", "proxies")
# Tensors CLIP files carry that CLIPTextModel has no place for (the projection, the logit scale, old buffers).
_CLIP_EXTRAS = {"text_projection.weight", "logit_scale", "embeddings.position_ids"}
_SHOWN = 5  # names listed per kind of mismatch

# BFL -> diffusers module names (diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, any width).
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_GUIDANCE = "time_text_embed.guidance_embedder."
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)\.(\w+)")


class FluxFileError(UserError, ValueError):
    """A FLUX.1 part file that cannot be read or does not fit its component; the message names the file."""


def load_pipeline(
    source: str, loader: str, folder: str | None, parts: Mapping[str, str], options: dict[str, Any]
) -> FluxPipeline:
    """A FluxPipeline from a diffusers folder or hub id (`from_pretrained`), or from a BFL transformer file
    with `folder`'s other components and configs (`from_single_file`); `parts` ("clip_l", "t5xxl", "ae":
    .safetensors paths; empty ones ignored) replace those components either way, configured by the same
    folder. `options` are from_pretrained's (`local_files_only`, `dtype`, ...)."""
    from diffusers import FluxPipeline

    if loader not in ("from_pretrained", "from_single_file"):
        raise ValueError(f"unknown loader {loader!r}: want from_pretrained or from_single_file")
    parts = {name: path for name, path in parts.items() if path}  # unset config fields
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown FLUX.1 part(s) {', '.join(unknown)}: want {', '.join(PARTS)}")
    base = source if loader == "from_pretrained" else folder or DEFAULT_CONFIG
    loaders: dict[str, Callable[[str, str, dict[str, Any]], nn.Module]] = {
        "clip_l": load_clip_l,
        "t5xxl": load_t5xxl,
        "ae": load_ae,
    }
    components: dict[str, Any] = {PARTS[name]: loaders[name](path, base, options) for name, path in parts.items()}
    if loader == "from_single_file":
        components["transformer"] = load_transformer(source, base, options)
    return FluxPipeline.from_pretrained(base, **components, **options)


def load_transformer(path: str, base: str, options: dict[str, Any]) -> FluxTransformer2DModel:
    """BFL's transformer file (bare names, or a ComfyUI checkpoint's `model.diffusion_model.` part) in the
    architecture of `base`'s `transformer` config."""
    from diffusers import FluxTransformer2DModel

    state = _read(path, "transformer")
    if any(k.startswith(COMFY_PREFIX) for k in state):  # a whole ComfyUI checkpoint: its transformer only
        state = {k[len(COMFY_PREFIX) :]: v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    config = FluxTransformer2DModel.load_config(base, subfolder="transformer", **_hub(options))
    if any(k.startswith("double_blocks.") for k in state):
        state = bfl_to_diffusers(state, config["num_attention_heads"] * config["attention_head_dim"])
    return _diffusers_model(FluxTransformer2DModel, config, state, path, "transformer", base, options)


def load_ae(path: str, base: str, options: dict[str, Any]) -> AutoencoderKL:
    """FLUX.1's `ae.safetensors` (ldm names), converted by diffusers' own ldm VAE converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = _read(path, "ae")
    config = AutoencoderKL.load_config(base, subfolder="vae", **_hub(options))
    if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.", "vae.")) for k in state):
        state = convert_ldm_vae_checkpoint(state, config)
    return _diffusers_model(AutoencoderKL, config, state, path, "ae", base, options)


def load_clip_l(path: str, base: str, options: dict[str, Any]) -> CLIPTextModel:
    """A CLIP-L text model file, its names with or without `text_model.` (ComfyUI's have it; transformers 5
    names CLIPTextModel's tensors without)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", **_hub(options))
    expected = _expected(lambda: CLIPTextModel(config))
    prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    state = {prefix + k.removeprefix("text_model."): v for k, v in _read(path, "clip_l").items()}
    state = {k: v for k, v in state.items() if k.removeprefix("text_model.") not in _CLIP_EXTRAS}
    _check(state, expected, path, "clip_l", base)
    return _transformers_model(CLIPTextModel, config, state, options)


def load_t5xxl(path: str, base: str, options: dict[str, Any]) -> T5EncoderModel:
    """A T5 encoder file; its token embedding as `shared.weight`, `encoder.embed_tokens.weight` or both
    (the two are one tied tensor)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(base, subfolder="text_encoder_2", **_hub(options))
    expected = _expected(lambda: T5EncoderModel(config))
    state = _read(path, "t5xxl")
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    for key, other in (tied, tied[::-1]):
        if key in expected and key not in state and other in state:
            state[key] = state[other]
    _check(state, expected, path, "t5xxl", base)
    return _transformers_model(T5EncoderModel, config, state, options)


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """BFL's transformer names as diffusers', as diffusers' converter does for FLUX.1's 3072 wide transformer,
    at any `width` (heads x head size): its converter hard-codes 3072, so it cannot read a smaller model.
    A name it does not know is kept, for the fit check to report."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _TOP:  # BFL's final layer projects (shift, scale); diffusers' (scale, shift)
            value = torch.cat(value.chunk(2)[::-1]) if module.startswith("final_layer.adaLN") else value
            out[f"{_TOP[module]}.{param}"] = value
            continue
        match = _BLOCK.fullmatch(key)
        names = (_DOUBLE if match[1] == "double" else _SINGLE) if match else {}
        if not match or match[3] not in names:
            out[key] = value
            continue
        prefix = f"{'transformer_blocks' if match[1] == 'double' else 'single_transformer_blocks'}.{match[2]}."
        target, param = names[match[3]], "weight" if match[4] == "scale" else match[4]
        if isinstance(target, str):
            out[f"{prefix}{target}.{param}"] = value
            continue
        rows = value.shape[0]  # q, k, v in equal thirds; linear1's q, k, v `width` rows each, then the MLP's in
        sizes = [rows // 3] * 3 if len(target) == 3 else [width] * 3 + [rows - 3 * width]
        if rows != sum(sizes) or min(sizes) <= 0:
            out[key] = value  # not this width: reported as unexpected
            continue
        for part, piece in zip(target, torch.split(value, sizes), strict=True):
            out[f"{prefix}{part}.{param}"] = piece
    return out


def _hub(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in _HUB_OPTIONS if k in options}


def _dtype(options: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype asked for: diffusers' and transformers' `dtype`, or its older name `torch_dtype`."""
    return options.get("dtype") or options.get("torch_dtype")


def _read(path: str, part: str) -> dict[str, torch.Tensor]:
    """The tensors of a part's `.safetensors` file; anything else is refused before it is opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if file.suffix.lower() != ".safetensors":
        raise FluxFileError(f"{part} file {path}: want a .safetensors file (other formats are pickles, not read)")
    if not file.is_file():
        raise FluxFileError(f"{part} file {path}: no such file")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FluxFileError(f"{part} file {path}: not a readable safetensors file ({err})") from None


def _expected(build: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    """The tensor names and shapes a model built by `build` has, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def _check(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: str, part: str, base: str
) -> None:
    """Every tensor of the component, no other, each its shape: otherwise an error naming the file and the
    first names that do not fit."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)}, want {tuple(expected[k])}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    found = [
        f"{len(names)} {what} (first: {', '.join(names[:_SHOWN])})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
        if names
    ]
    hint = ""
    if any(k.endswith(("scale_weight", "weight_scale", "scaled_fp8")) for k in unexpected):
        hint = "; ComfyUI's scaled fp8 files are not supported: use the fp16/bf16 (or plain fp8) file"
    elif missing and all(k.startswith(_GUIDANCE) for k in missing):
        hint = "; it has no guidance embedding (FLUX.1-schnell?): pass a schnell folder as --base-model-config"
    elif unexpected and all(k.startswith(_GUIDANCE) for k in unexpected):
        hint = "; it has a guidance embedding (FLUX.1-dev?): pass a dev folder as --base-model-config"
    raise FluxFileError(
        f"{part} file {path} is not {_DESCRIBED[part]} of {base}'s architecture: tensors {'; '.join(found)}{hint}"
    )


def _diffusers_model(
    cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], path: str, part: str, base: str, options: dict
) -> Any:
    """A diffusers model of `config` holding `state` (in diffusers' names, checked), loaded by diffusers'
    single-file loader (which converts nothing once the names fit)."""
    _check(state, _expected(lambda: cls.from_config(config)), path, part, base)
    subfolder = "transformer" if part == "transformer" else "vae"
    # No dtype means the model's own, float32 (diffusers casting to one warns about fp32 modules).
    dtype = {"dtype": _dtype(options)} if _dtype(options) else {}
    return cls.from_single_file(state, config=base, subfolder=subfolder, **dtype, **_hub(options))


def _transformers_model(cls: Any, config: Any, state: dict[str, torch.Tensor], options: dict) -> Any:
    """A transformers model of `config` holding `state` (checked), built by transformers' own loader."""
    import torch

    return cls.from_pretrained(None, config=config, state_dict=state, dtype=_dtype(options) or torch.float32).eval()
