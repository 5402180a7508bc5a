"""Where training runs and in which precision: one object the trainer and the renderers share.

We own the mixed-precision step with `torch.amp` rather than accelerate's
`Accelerator`: accelerate keeps its precision in a per-process singleton, so a
worker that trains an SD1.5 subject in fp16 and then an SDXL one in bf16 (or
the out-of-memory ladder's precision rung) would fail in the second
`Accelerator`. `torch.amp` has no such state, and runs the same fp16/bf16
autocast and loss scaling on the CPU as on a GPU, so the tests exercise the
code path our users' cards take.

The rules (as diffusers' and sd-scripts' trainers follow them):

- Frozen base weights are stored in the training dtype (half the memory in
  fp16/bf16); the trained LoRA weights and the optimizer state stay in fp32.
- fp16 needs loss scaling (`GradScaler`: unscale before clipping, skip the step
  and shrink the scale on inf/NaN gradients, grow it back); bf16 does not.
- A VAE never runs in fp16: SDXL's overflows to NaN/black images. It decodes
  in fp32, or under bf16 autocast when training in bf16.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from lora_core.foundation.errors import UserError

__all__ = ["DeviceError", "Precision", "bf16_supported", "resolve_device", "resolve_precision", "share_cores"]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceError(UserError, ValueError):
    """A device that cannot be used here; the message says which and why."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` checked against this machine; None picks `cuda` when there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise DeviceError(f"device {device!r}: want cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {text}: this torch sees no CUDA device (install the CUDA build of torch)")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(text)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: the CPU, or a GPU of compute capability 8.0 (Ampere) or later.

    Not `torch.cuda.is_bf16_supported()`: it answers True on Turing and Volta too (it only checks that a bf16
    tensor can be made there), where cuDNN has no bf16 convolutions and a UNet runs slowly or fails; and it
    asks about the current device, not the one a run was given.
    """
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def share_cores(subjects: int, cores: int | None = None) -> int:
    """Give this process its share of the CPU when `subjects` train on one machine at once, and return it.

    torch's default of one thread per core in every process oversubscribes the
    cores when several runs share them (OpenMP threads spin: 10-30x slower on 2
    cores), so each run takes cores // subjects threads, at least one.
    """
    cores = cores or len(os.sched_getaffinity(0)) or 1  # the cores this process may use (taskset, cgroups)
    threads = max(1, cores // max(1, subjects))
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class Precision:
    """A device and the precision training really uses there (`name` is kohya's `mixed_precision`)."""

    device: torch.device
    name: str = "no"  # "no", "fp16" or "bf16"
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen weights and of autocast."""
        return _DTYPES[self.name]

    def autocast(self) -> AbstractContextManager:
        """Autocast to the training dtype on this device (a no-op in fp32)."""
        if self.name == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def vae_autocast(self) -> AbstractContextManager:
        """The VAE's precision: bf16 autocast when training in bf16, else fp32 with autocast off (never fp16)."""
        if self.name == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; a disabled scaler (scale 1, steps never skipped) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def resolve_precision(mixed_precision: str, device: str | torch.device | None) -> Precision:
    """The precision a run really uses on `device`.

    An explicit device honours `mixed_precision`, on the CPU too (bf16 is fast
    on recent Xeons; fp16 and bf16 there are how the tests run the GPU's code).
    With no device given and no GPU, the CPU falls back to fp32 with a note,
    since half precision there is rarely what a user asking for "fp16" wants.
    A GPU without bf16 (compute capability under 8.0: the recipe's RTX 2060 Super, any Turing or Volta
    card) trains in fp16 with loss scaling instead, with a note.
    """
    explicit = device is not None
    where = resolve_device(device)
    name = str(getattr(mixed_precision, "value", mixed_precision))
    if name not in _DTYPES:
        raise ValueError(f"mixed_precision {name!r}: want no, fp16 or bf16")
    notes: list[str] = []
    if where.type == "cpu" and name != "no" and not explicit:
        notes.append(f"mixed_precision {name} on the CPU only with an explicit --device cpu: training in fp32")
        name = "no"
    if where.type == "cuda" and name == "bf16" and not bf16_supported(where):
        major, minor = torch.cuda.get_device_capability(where)
        notes.append(
            f"{torch.cuda.get_device_name(where)} ({where}, compute capability {major}.{minor}) has no bf16 "
            "(8.0 and later do): training in fp16 with loss scaling"
        )
        name = "fp16"
    return Precision(where, name, tuple(notes))
