"""The pieces of `bench.gpu`'s rounds: memory figures, the frozen weights' dtype, the optimizer's state, one
more step after a resume, the sample's check, and a timed round of each side (ours, the plain loop) on freshly
built weights.

The rounds alternate, ours then the plain loop, at least three each, so a card warming up or a neighbour's
load falls on both sides alike; each round builds its models anew and frees them, one model at a time.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
from typing import Any

import torch

from bench.bare_flux import flux_sample_decodes, learns_flow, plain_loop
from bench.bare_loop import BareInputs
from bench.measure import StepClock, sample_decodes
from bench.models import Architecture, build_base, fingerprint

__all__ = [
    "bare_round",
    "cast_frozen",
    "free",
    "one_more_step",
    "optimizer_values",
    "ours_round",
    "peak_gb",
    "reset_peak",
    "same_values",
    "sample_finite",
]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def cast_frozen(base: Any, precision: str) -> None:
    """Frozen UNet and text encoders in the training dtype, as the trainer keeps them (the VAE stays fp32).

    Our models are built on the device in fp32 (fast, seeded); a real run loads
    them in host memory and the trainer casts while moving, so the GPU never
    holds an fp32 copy. Casting first keeps that copy out of the measured peak.
    FLUX's transformer is already on the host in bf16 (`bench.models.build_transformer`).
    """
    for module in (base.unet, *base.text_encoders):
        module.to(dtype=_DTYPES[precision])


def optimizer_values(trainer: Any) -> dict[str, torch.Tensor]:
    """Every trained parameter's optimizer slots, by position and name, copied to the host: a resume is checked
    on these values, not on the slots' names (8-bit AdamW keeps uint8 moments and their scales)."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        f"{index}.{key}": value.detach().to("cpu", copy=True)
        for index, param in enumerate(params)
        for key, value in optimizer.state.get(param, {}).items()
        if torch.is_tensor(value)
    }


def same_values(saved: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> bool:
    return bool(saved) and saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def sample_finite(base: Any, inputs: BareInputs, config: Any, precision: str, device: torch.device) -> bool:
    """A few denoising steps with the trained denoiser, decoded in fp32, every pixel finite: DDIM for the SD
    families, Euler along the flow for a flow model (the family's objective says which)."""
    check = flux_sample_decodes if learns_flow(base, config) else sample_decodes
    return check(base, inputs, precision, device)


class _Stop(Exception):
    pass


def one_more_step(trainer: Any) -> list[float]:
    """Run the next epoch's first step only (stopped from `on_step`), or the whole epoch without `on_step`."""
    losses: list[float] = []
    if "on_step" not in inspect.signature(trainer.run_epoch).parameters:
        return list(trainer.run_epoch(trainer.epoch + 1).losses)

    def stop(step: int, loss: float, lr: float) -> None:
        losses.append(loss)
        raise _Stop

    with contextlib.suppress(_Stop):
        trainer.run_epoch(trainer.epoch + 1, on_step=stop)
    return losses


def ours_round(
    arch: Architecture, config: Any, layout: Any, precision: str, device: torch.device, warmup: int
) -> float:
    """One timed epoch of our `Trainer` on fresh weights (its set-up untimed): steps/s."""
    from lora_core.training.trainer import Trainer

    base = build_base(arch, seed=0, device=device)
    cast_frozen(base, precision)
    trainer = Trainer(config, base, layout, device=str(device), show_progress=False)
    clock = StepClock(base.unet, warmup=warmup, device=device)
    trainer.run_epoch(1)
    clock.stop()
    del trainer, base
    free()
    return clock.steps_per_s


def bare_round(
    arch: Architecture, inputs: BareInputs, config: Any, precision: str, device: torch.device, steps: int, warmup: int
) -> dict[str, Any]:
    """One timed run of the plain loop on fresh weights: steps/s, its peak, its losses, and that the weights
    were ours (the same seed builds the same UNet)."""
    base = build_base(arch, seed=0, device=device)
    weights = fingerprint(base.unet)
    base.vae.to("cpu")  # the plain loop never uses it
    if not config.train_text_encoder:
        for encoder in base.text_encoders:
            encoder.to("cpu")
    free()
    reset_peak(device)
    bare = plain_loop(base, inputs, config, precision=precision, device=device)
    clock = StepClock(base.unet, warmup=warmup, device=device)
    losses = bare.train(steps)
    clock.stop()
    out = {"steps_per_s": clock.steps_per_s, "peak": peak_gb(device), "losses": losses, "weights": weights}
    del bare, base, clock
    free()
    return out
