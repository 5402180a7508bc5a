"""LoRA files in kohya's format: the modules it trains, its key names, its metadata.

What sd-scripts' default LoRA network does (networks/lora.py), and so what
InvokeAI, ComfyUI, AUTOMATIC1111 and diffusers all load:

- Targets: inside every `Transformer2DModel` of the UNet, each `Linear` and 1x1
  `Conv2d`; inside every CLIP attention and MLP, each `Linear`. SD1.5 has 192
  UNet and 72 text-encoder modules; SDXL 722 UNet, 72 + 192 text-encoder ones.
- Names: a prefix (`lora_unet`, `lora_te`, or `lora_te1`/`lora_te2` for SDXL's
  two encoders) and the module path with dots turned to underscores. SD1.5's
  UNet paths are diffusers'; SDXL's are Stability's (`input_blocks_4_1_...`),
  as sd-scripts trains SDXL on that module tree. Text-encoder paths start
  `text_model_` (transformers 5 dropped that level from `CLIPTextModel`; every
  loader still expects it).
- Tensors: `<name>.lora_down.weight` [rank, in(,1,1)], `<name>.lora_up.weight`
  [out, rank(,1,1)] and `<name>.alpha`, a 0-d tensor holding network_alpha; the
  update is `alpha / rank * up @ down`.

Our trainer injects peft LoRA layers into exactly these modules, so peft's
`lora_A`/`lora_B` are kohya's `lora_down`/`lora_up` under another name.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from lora_core.foundation.errors import DAMAGED_FILE_ERRORS, UserError
from lora_core.foundation.fs import atomic_write_bytes

__all__ = [
    "LoraFileError",
    "LoraTarget",
    "kohya_name",
    "kohya_targets",
    "model_hash",
    "read_lora",
    "read_metadata",
    "save_lora",
]

_UNET_BLOCKS = ("Transformer2DModel",)
_TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class LoraFileError(UserError, ValueError):
    """A LoRA file that cannot be used here; the message names the file and the key."""


@dataclass(frozen=True)
class LoraTarget:
    """One trained module: kohya's name for it, and where it is in our model."""

    name: str  # kohya's, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    component: str  # "unet", "text_encoder", "text_encoder_2"
    path: str  # module path inside that component, as named_modules() gives it


def _is_target_layer(module: nn.Module) -> bool:
    # Exact classes, as sd-scripts matches class names: a peft wrapper is not a target again.
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.kernel_size == (1, 1)


def _target_paths(root: nn.Module, blocks: tuple[str, ...]) -> list[str]:
    paths: list[str] = []
    for name, module in root.named_modules():
        if type(module).__name__ in blocks:
            for child, layer in module.named_modules():
                if child and _is_target_layer(layer):
                    paths.append(f"{name}.{child}")
    return list(dict.fromkeys(paths))


_SDXL_UNET = [
    (re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"input_blocks.{3 * i + j + 1}.1."),
    (re.compile(r"^mid_block\.attentions\.0\."), lambda: "middle_block.1."),
    (re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"output_blocks.{3 * i + j}.1."),
]


def _sgm_path(path: str) -> str:
    """A diffusers SDXL UNet attention path in Stability's naming (sd-scripts' sdxl_model_util map)."""
    for pattern, replace in _SDXL_UNET:
        match = pattern.match(path)
        if match:
            return replace(*map(int, match.groups())) + path[match.end() :]
    raise ValueError(f"no Stability name for SDXL UNet module {path!r}")


def kohya_name(component: str, path: str, sdxl: bool, sgm: bool = True) -> str:
    """kohya's LoRA name for the module at `path` in `component`."""
    if component == "unet":
        return "lora_unet_" + (_sgm_path(path) if sdxl and sgm else path).replace(".", "_")
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    if not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_targets(components: dict[str, nn.Module], sdxl: bool) -> list[LoraTarget]:
    """Every module kohya's default LoRA trains in `components` ("unet", "text_encoder", "text_encoder_2")."""
    targets: list[LoraTarget] = []
    for component, root in components.items():
        blocks = _UNET_BLOCKS if component == "unet" else _TEXT_BLOCKS
        targets += [LoraTarget(kohya_name(component, p, sdxl), component, p) for p in _target_paths(root, blocks)]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError("two modules share a kohya name")
    return targets


# --- Writing ------------------------------------------------------------------------


def _data_hash(blob: bytes) -> str:
    """sha256 of the tensor data after the header: sd-scripts' `sshs_model_hash`."""
    (header,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header :]).hexdigest()


def _legacy_hash(blob: bytes) -> str:
    """sd-scripts' `sshs_legacy_hash`: 8 hex digits of the sha256 of bytes 1 MiB to 1 MiB + 64 KiB."""
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def model_hash(path: Path) -> str:
    """`sshs_model_hash` of a saved LoRA file (does not depend on its metadata)."""
    return _data_hash(Path(path).read_bytes())


def save_lora(
    path: Path,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> dict[str, str]:
    """Write `{kohya name: (down, up)}` as a kohya LoRA `.safetensors`, atomically; return its metadata.

    The `sshs_*` hashes are computed as sd-scripts computes them, so tools that
    show or check them agree.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in sorted(weights.items()):
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
    metadata = {k: str(v) for k, v in metadata.items()}
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    probe = save_bytes(tensors, ss_only)
    metadata |= {"sshs_model_hash": _data_hash(probe), "sshs_legacy_hash": _legacy_hash(probe)}
    atomic_write_bytes(Path(path), save_bytes(tensors, metadata))
    return metadata


# --- Reading ------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A kohya-format LoRA read back: per module name, its down and up weights and alpha."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    metadata: dict[str, str]

    @property
    def rank(self) -> int:
        return max(down.shape[0] for down, _, _ in self.modules.values())


def read_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's `ss_*` metadata alone, without reading its tensors."""
    try:
        with safe_open(Path(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except DAMAGED_FILE_ERRORS as err:
        raise LoraFileError(f"{path}: not a readable safetensors file ({err})") from None


def read_lora(path: Path) -> LoraFile:
    """Read a kohya-format LoRA `.safetensors` (never a pickle); validate its structure."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are read (a pickle can run code)")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except DAMAGED_FILE_ERRORS as err:
        raise LoraFileError(f"{path}: not a readable safetensors file ({err})") from None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            if not key.endswith((".lora_up.weight", ".alpha")):
                raise LoraFileError(f"{path}: key {key!r} is not kohya LoRA (want .lora_down/.lora_up/.alpha)")
            continue
        name = key.removesuffix(".lora_down.weight")
        down = tensors[key]
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise LoraFileError(f"{path}: {name} has lora_down but no lora_up")
        alpha_tensor = tensors.get(f"{name}.alpha")
        alpha = float(alpha_tensor.float().item()) if alpha_tensor is not None else float(down.shape[0])
        modules[name] = (down, up, alpha)
    if not modules:
        raise LoraFileError(f"{path}: no LoRA modules in it")
    return LoraFile(modules, dict(metadata))


def tag_frequency(captions: Iterable[str], folder_name: str) -> str:
    """`ss_tag_frequency` as sd-scripts writes it: JSON {folder: {tag: count}}, tags split on commas, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip().lower() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps({folder_name: counts})
