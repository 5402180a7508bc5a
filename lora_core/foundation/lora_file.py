"""LoRA files in kohya's format: the file InvokeAI, ComfyUI, AUTOMATIC1111 and diffusers all load.

- Tensors: `<name>.lora_down.weight` [rank, in(,1,1)], `<name>.lora_up.weight`
  [out, rank(,1,1)] and `<name>.alpha`, a 0-d tensor holding network_alpha; the
  update is `alpha / rank * up @ down`.
- Names: a prefix and a module path with dots turned to underscores; which
  modules, and their names, are each model family's (`lora_core.families`).
- Metadata: sd-scripts' `ss_*` keys and its `sshs_*` hashes, computed as it does.

Files are written atomically and read as safetensors only, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from lora_core.foundation.errors import DAMAGED_FILE_ERRORS, UserError
from lora_core.foundation.fs import atomic_write_bytes

__all__ = [
    "LoraFile",
    "LoraFileError",
    "model_hash",
    "read_lora",
    "read_metadata",
    "save_lora",
]


class LoraFileError(UserError, ValueError):
    """A LoRA file that cannot be used here; the message names the file and the key."""


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
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    alpha: float,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> dict[str, str]:
    """Write `{kohya name: (down, up)}` (or `(down, up, alpha)` where a module has its own alpha, as a fused
    one does) as a kohya LoRA `.safetensors`, atomically; return its metadata.

    The `sshs_*` hashes are computed as sd-scripts computes them, so tools that
    show or check them agree.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, *own) in sorted(weights.items()):
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(own[0] if own else alpha)).to(dtype)
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
    # kohya's `.lora_down/.lora_up`, or the diffusers/PEFT format's `.lora_A/.lora_B` (what diffusers'
    # examples and ai-toolkit write), whose module names stay as they are for the family to map.
    for down_key, up_key in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
        for key in tensors:
            if not key.endswith(down_key):
                continue
            name = key.removesuffix(down_key)
            down = tensors[key]
            up = tensors.get(f"{name}{up_key}")
            if up is None:
                down_part, up_part = down_key.split(".")[1], up_key.split(".")[1]
                raise LoraFileError(f"{path}: {name} has {down_part} but no {up_part}")
            alpha_tensor = tensors.get(f"{name}.alpha")
            alpha = float(alpha_tensor.float().item()) if alpha_tensor is not None else float(down.shape[0])
            modules[name] = (down, up, alpha)
    lora_suffixes = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")
    stray = [key for key in tensors if not key.endswith(lora_suffixes)]
    if stray:
        raise LoraFileError(
            f"{path}: key {stray[0]!r} is not LoRA (want kohya's .lora_down/.lora_up/.alpha or .lora_A/.lora_B)"
        )
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
