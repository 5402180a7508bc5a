"""Out of GPU memory: the recipe's ladder, ordered by memory saved per speed lost, and freeing memory between tries.

The recipe climbs it by hand ("enable cache latents to disk, change from fp16
to bf16, reduce the batch size from 2 to 1"). We order the rungs so the
cheapest saving comes first, and drop the one that saves no VRAM here: our
latents always live in host memory, so writing them to disk frees none.

1. cache latents (when `cache_latents` is off): the VAE leaves the GPU, and
   no step encodes images any more; faster, not slower;
2. half precision (when training in fp32): frozen weights and activations
   halve, and the step gets faster; bf16 where the GPU has it;
3. gradient checkpointing: most activation memory, for about 25% more time;
   then the family's own steps (FLUX.1: fp8 to 4-bit NF4 base weights, T5 at 256 tokens);
4. the batch halved, down to 1: activations shrink with it, at a little
   throughput;
5. UNet only: the text encoders stop training (their outputs are cached and
   the encoders leave the GPU); it changes what is learned, so it comes last.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from lora_core.config.lora_config import LoraConfig
from lora_core.families import family_named

__all__ = ["apply_steps", "free_memory", "is_fatal_cuda_error", "oom_step"]


def oom_step(config: LoraConfig, bf16_ok: bool) -> tuple[dict[str, Any], str] | None:
    """The next rung to try after CUDA ran out of memory: `(config updates, note)`; None when spent."""
    if not config.cache_latents and not config.cache_latents_to_disk:
        return {"cache_latents": True}, "cache latents"
    if config.mixed_precision.value == "no":
        precision = "bf16" if bf16_ok else "fp16"
        return {"mixed_precision": precision}, f"train in {precision}"
    if not config.gradient_checkpointing:
        return {"gradient_checkpointing": True}, "gradient checkpointing"
    own = family_named(config.model_family).oom_step(config)
    if own is not None:
        return own
    if config.train_batch_size > 1:
        size = config.train_batch_size // 2
        return {"train_batch_size": size}, f"halve the batch to {size}"
    if config.train_text_encoder:
        return {"train_text_encoder": False}, "train the UNet only"
    return None


def apply_steps(config: LoraConfig, steps: list[dict[str, Any]]) -> LoraConfig:
    """`config` with the out-of-memory steps taken so far, and a note of them in `training_comment`."""
    if not steps:
        return config
    updates: dict[str, Any] = {}
    for step in steps:
        updates |= step["updates"]
    comment = "out of memory; took: " + ", ".join(step["note"] for step in steps)
    return LoraConfig.model_validate(config.model_dump() | updates | {"training_comment": comment})


def free_memory() -> None:
    """Return what dropped models held to the GPU, before the next attempt loads its own copy.

    Call it after the last reference is gone (and outside any `except` block,
    whose traceback keeps the failed attempt's frames, and so its tensors, alive).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Errors after which this process's CUDA context is unusable: only a new process can go on.
_FATAL_CUDA = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction",
    "uncorrectable ECC error",
)


def is_fatal_cuda_error(error: BaseException) -> bool:
    """True for a CUDA error that poisons the context: retrying in the same process fails again."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(phrase in text for phrase in _FATAL_CUDA)
