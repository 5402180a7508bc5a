"""Clocks and checks the benches share: timed steps, finiteness, the epoch boundary, a decoded sample."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bare_loop import BareInputs, autocast
from lora_core.families.family import LoadedModel

__all__ = ["StepClock", "all_finite", "cap_vram", "epoch_boundary", "precision_name", "sample_decodes", "timed"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepClock:
    """Times training steps by the UNet's forward calls (one per step), whoever runs the loop.

    Hooks on the UNet see the same event in our trainer and in the plain loop,
    without depending on the trainer's internals. Steps before `warmup` + 1 are
    not timed; the clock starts at the UNet call of the first timed step and
    stops at `stop()` (after the last step). On the CPU it also sums the time
    spent inside the UNet's forward, to tell forward from the rest of a step.
    """

    unet: torch.nn.Module
    warmup: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calls: int = 0
    forward: float = 0.0
    started: float | None = None
    seconds: float = 0.0
    _entered: float = 0.0
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handles = [
            self.unet.register_forward_pre_hook(self._pre),
            self.unet.register_forward_hook(self._post),
        ]

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1
        if self.calls == self.warmup + 1:
            _sync(self.device)
            self.started = time.perf_counter()
        self._entered = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.started is not None:
            self.forward += time.perf_counter() - self._entered

    def stop(self) -> StepClock:
        _sync(self.device)
        if self.started is None:
            raise RuntimeError(f"only {self.calls} step(s) ran; the clock needs more than {self.warmup}")
        self.seconds = time.perf_counter() - self.started
        for handle in self._handles:
            handle.remove()
        return self

    @property
    def steps(self) -> int:
        return self.calls - self.warmup

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


@contextmanager
def timed(device: torch.device) -> Iterator[list[float]]:
    """`with timed(device) as t:` ... then `t[0]` is the seconds taken (the device synchronised)."""
    out: list[float] = []
    _sync(device)
    start = time.perf_counter()
    yield out
    _sync(device)
    out.append(time.perf_counter() - start)


def precision_name(trainer: Any) -> str:
    """The precision the trainer really uses (after any fallback)."""
    return trainer.precision.name


def all_finite(values: list[float]) -> bool:
    return bool(values) and all(np.isfinite(values))


def epoch_boundary(trainer: Any, stats: Any, repeats: int = 3) -> dict[str, Any]:
    """Seconds of the work between two epoch tasks: `save_epoch` and the epoch's markdown artifact.

    The artifact is built by `tasks.artifacts.publish_epoch` itself, with
    Prefect's `create_markdown_artifact` replaced by a function that keeps the
    markdown: sending it needs a Prefect server and is not measured. The
    median of `repeats` runs, each writing the same epoch's files again.
    """
    from unittest import mock

    try:
        import tasks.artifacts
    except ImportError:  # no Prefect on this machine (a bare GPU box): time the save alone, say so
        tasks = None

    run_key = "b" * 64
    info = {
        "session_id": "0",
        "started_at": str(time.time()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "network_weights": "",
    }
    from lora_core.training.state import save_epoch as save

    kept: list[dict[str, Any]] = []
    saves, artifacts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        path = save(trainer, run_key, info, stats)
        saves.append(time.perf_counter() - start)
        if tasks is None:
            continue
        with mock.patch.object(tasks.artifacts, "create_markdown_artifact", lambda **kw: kept.append(kw)):
            start = time.perf_counter()
            tasks.artifacts.publish_epoch(trainer.layout.token, stats.epoch, stats.losses, stats.lrs, path)
            artifacts.append(time.perf_counter() - start)
    lora_bytes = Path(path).stat().st_size if path else 0
    return {
        "save_epoch_s": float(np.median(saves)),
        "artifact_s": float(np.median(artifacts)) if artifacts else 0.0,
        "artifact_timed": bool(artifacts),
        "lora_bytes": lora_bytes,
        "markdown_chars": len(kept[-1]["markdown"]) if kept else 0,
    }


@torch.no_grad()
def sample_decodes(
    base: LoadedModel, inputs: BareInputs, precision: str, device: str | torch.device, steps: int = 4
) -> bool:
    """Denoise one latent with the trained UNet (DDIM, the training precision), decode it with the VAE in fp32.

    True when every pixel is finite. The VAE runs in fp32 outside autocast, as
    our renderer decodes (SDXL's VAE overflows in fp16).
    """
    from diffusers import DDIMScheduler

    device = torch.device(device)
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn((1, *inputs.latents.shape[1:]), generator=generator, device=device)
    extra = {}
    if base.family.name == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": inputs.pooled[:1], "time_ids": inputs.time_ids[:1]}}
    was_training = base.unet.training
    base.unet.eval()
    with autocast(device, precision):
        for t in scheduler.timesteps:
            noise = base.unet(latents, t.to(device), inputs.hidden[:1], **extra).sample
            latents = scheduler.step(noise.float(), t, latents).prev_sample
    base.unet.train(was_training)
    vae = base.vae
    home = next(vae.parameters()).device
    vae.to(device, torch.float32)
    with torch.autocast(device.type, enabled=False):
        image = vae.decode(latents.float() / vae.config.scaling_factor).sample
    vae.to(home)
    return bool(torch.isfinite(image).all())


def cap_vram(device: torch.device, gb: float | None) -> float | None:
    """Cap the process's memory on `device` at `gb` (torch's allocator refuses past it, as a smaller card would)."""
    if gb is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), device)
    return gb
