"""Write a diffusers FLUX.1 folder's parts as the single files users have (ComfyUI's, sd-scripts' inputs).

Test support only: the tiny FLUX exists only as a diffusers folder, and the
single-file path must run on it. The transformer is written in Black Forest
Labs' own names (`flux1-dev.safetensors`: fused qkv, `.scale` norms), the
autoencoder in ldm names (`ae.safetensors`), and the text encoders in
transformers' names as ComfyUI ships them (`clip_l.safetensors` with
`text_model.`, `t5xxl_fp16.safetensors`). Each writer is the exact inverse of
the converter that reads it (diffusers' for the transformer and the VAE).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.ldm_checkpoint import vae_name

__all__ = ["to_bfl", "to_ldm_vae", "write_ae", "write_clip_l", "write_t5", "write_transformer"]

Tweak = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

# diffusers -> BFL module names that only change name.
_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {
    "norm.linear": "modulation.lin",
    "proj_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
# BFL's fused layers, from diffusers' parts in the order BFL concatenates them.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous projects (scale, shift); BFL's final layer (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL's names (what `flux1-dev.safetensors` holds)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    blocks = sorted({tuple(k.split(".")[:2]) for k in state if re.match(r"(single_)?transformer_blocks\.\d+\.", k)})
    for kind, index in blocks:
        prefix = f"{kind}.{index}."
        double = kind == "transformer_blocks"
        names = _DOUBLE if double else _SINGLE
        bfl = f"{'double' if double else 'single'}_blocks.{index}."
        for fused, parts in (_DOUBLE_FUSED if double else _SINGLE_FUSED).items():
            for param in ("weight", "bias"):
                keys = [f"{prefix}{part}.{param}" for part in parts]
                out[f"{bfl}{fused}.{param}"] = torch.cat([state[k] for k in keys], dim=0)
                used.update(keys)
        for key in state:
            if key.startswith(prefix) and key not in used:
                module, _, param = key[len(prefix) :].rpartition(".")
                param = "scale" if module.startswith(("attn.norm_q", "attn.norm_k", "attn.norm_added")) else param
                out[f"{bfl}{names[module]}.{param}"] = state[key]
                used.add(key)
    for key, value in state.items():
        if key in used:
            continue
        module, _, param = key.rpartition(".")
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(value)
        else:
            out[f"{_TOP[module]}.{param}"] = value
    return out


def to_ldm_vae(state: Mapping[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the ldm names FLUX's `ae.safetensors` uses (no prefix; the
    mid-block attention's linears as 1x1 convs)."""
    out = {}
    for key, value in state.items():
        name, conv = vae_name(key, blocks)
        out[name] = value[:, :, None, None] if conv and value.dim() == 2 else value
    return out


def _read(folder: Path, file: str, tweak: Tweak | None) -> dict[str, torch.Tensor]:
    """A component's weights in the folder's names, edited by `tweak` (so a test can tell a file's weights
    from the folder's)."""
    state = load_file(Path(folder) / file)
    return state if tweak is None else tweak(state)


def _save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_transformer(folder: Path, path: Path, prefix: str = "", tweak: Tweak | None = None) -> None:
    """`folder`'s transformer as `flux1-dev.safetensors` (BFL names; `prefix` e.g. `model.diffusion_model.`);
    `tweak` edits the diffusers-named weights first."""
    state = _read(folder, "transformer/diffusion_pytorch_model.safetensors", tweak)
    _save({prefix + k: v for k, v in to_bfl(state).items()}, path)


def write_ae(folder: Path, path: Path, tweak: Tweak | None = None) -> None:
    """`folder`'s VAE as FLUX's `ae.safetensors` (ldm names, bare)."""
    blocks = len(json.loads((Path(folder) / "vae" / "config.json").read_text())["block_out_channels"])
    _save(to_ldm_vae(_read(folder, "vae/diffusion_pytorch_model.safetensors", tweak), blocks), path)


def write_clip_l(folder: Path, path: Path, tweak: Tweak | None = None) -> None:
    """`folder`'s CLIP-L as ComfyUI's `clip_l.safetensors`: transformers' names under `text_model.`."""
    state = _read(folder, "text_encoder/model.safetensors", tweak)
    _save({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}, path)


def write_t5(folder: Path, path: Path, tweak: Tweak | None = None) -> None:
    """`folder`'s T5 encoder as ComfyUI's `t5xxl_fp16.safetensors`: `shared.weight` and `encoder.*`."""
    _save(_read(folder, "text_encoder_2/model.safetensors", tweak), path)
