"""Write a diffusers SD1.5 folder as one original-layout checkpoint, as CivitAI files come.

Test support only: it lets the single-file loading path run on the tiny model,
which exists only as a diffusers folder. The names are Stability's original
(ldm) ones for SD1.x: `model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.`.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file, save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_name(key: str) -> str:
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{3 * i + j + 1}.0.{_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.conv.{m[2]}"
    raise KeyError(key)


def vae_name(key: str, blocks: int) -> tuple[str, bool]:
    """The ldm name, and whether the tensor is an attention linear that ldm keeps as a 1x1 conv."""
    side, _, rest = key.partition(".")
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    if side in ("quant_conv", "post_quant_conv"):
        return key, False
    head, _, tail = rest.partition(".")
    if head in simple:
        return f"{side}.{simple[head]}.{tail}", False
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        index = int(m[2]) if m[1] == "down" else blocks - 1 - int(m[2])
        return f"{side}.{m[1]}.{index}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2]}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        inner = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for old, new in inner.items():
            if m[1].startswith(old + "."):
                return f"{side}.mid.attn_1.{new}{m[1][len(old) :]}", old != "group_norm"
    raise KeyError(key)


def write_single_file(folder: Path, path: Path) -> None:
    """The diffusers SD1.5 pipeline in `folder` as one `.safetensors` in the original layout."""
    import json

    out = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + unet_name(key)] = value
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, conv = vae_name(key, blocks)
        out["first_stage_model." + name] = value[:, :, None, None] if conv and value.dim() == 2 else value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
