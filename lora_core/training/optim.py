"""The optimizer and learning-rate schedule of a run, from the config's names.

Names are checked at the config's edge (`Optimizer`, `LRScheduler` enums) and
dispatched through a table here, as diffusers' `get_scheduler` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from lora_core.config.lora_config import LoraConfig, Optimizer

__all__ = ["OPTIMIZERS", "make_optimizer", "make_scheduler", "param_groups"]


def _adamw(groups: list[dict[str, Any]], args: dict[str, Any], device: torch.device) -> tuple[Any, str | None]:
    return torch.optim.AdamW(groups, **args), None


def _adamw8bit(groups: list[dict[str, Any]], args: dict[str, Any], device: torch.device) -> tuple[Any, str | None]:
    if device.type != "cuda":  # bitsandbytes' 8-bit optimizers run on CUDA only
        return torch.optim.AdamW(groups, **args), "AdamW8bit needs a GPU (bitsandbytes): using torch AdamW on the CPU"
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, **args), None


def _adafactor(groups: list[dict[str, Any]], args: dict[str, Any], device: torch.device) -> tuple[Any, str | None]:
    from transformers.optimization import Adafactor

    # kohya's recommended fixed-LR Adafactor unless the user's optimizer_args say otherwise.
    args = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | args
    return Adafactor(groups, **args), None


OPTIMIZERS: dict[Optimizer, Callable[..., tuple[Any, str | None]]] = {
    Optimizer.AdamW: _adamw,
    Optimizer.AdamW8bit: _adamw8bit,
    Optimizer.Adafactor: _adafactor,
}


def param_groups(config: LoraConfig, unet: list[torch.nn.Parameter], text: list[torch.nn.Parameter]) -> list[dict]:
    """The UNet's LoRA at `unet_lr`, the text encoders' at `text_encoder_lr` (kohya's two rates)."""
    groups = [{"params": unet, "lr": config.unet_lr}]
    if text:
        groups.append({"params": text, "lr": config.text_encoder_lr})
    return groups


def make_optimizer(config: LoraConfig, groups: list[dict], device: torch.device) -> tuple[Any, str | None]:
    """The config's optimizer over `groups`, and a note when it had to be replaced on this device."""
    return OPTIMIZERS[config.optimizer](groups, dict(config.optimizer_args), device)


def make_scheduler(config: LoraConfig, optimizer: Any, total_steps: int, start: int = 0) -> Any:
    """diffusers' schedule of `lr_scheduler`, warm-up in percent of all steps, replayed to step `start`."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        config.lr_scheduler.value,
        optimizer,
        num_warmup_steps=round(total_steps * config.lr_warmup / 100),
        num_training_steps=total_steps,
        num_cycles=config.lr_scheduler_num_cycles,
    )
    with warnings.catch_warnings():  # replaying steps without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):  # the schedule is a pure function of the step: replay it
            scheduler.step()
    return scheduler
