"""The `ss_*` and `modelspec.*` metadata sd-scripts writes into a LoRA, so tools that read it show our runs.

Every value says what the run really did (the precision used, the optimizer
steps taken), with kohya's meanings, never just what the config asked for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core.config.lora_config import format_optimizer_args
from lora_core.foundation.lora_file import tag_frequency

if TYPE_CHECKING:
    from lora_core.dataset.train_data import TrainItem
    from lora_core.training.trainer import Trainer

__all__ = ["kohya_metadata", "tag_frequency_by_folder"]


def kohya_metadata(trainer: Trainer, epoch: int, run_info: dict[str, str]) -> dict[str, str]:
    """The metadata of epoch `epoch` of `trainer`'s run (`run_info`: the run's id, start and origin)."""
    meta = _run(trainer, epoch, run_info) | _optimisation(trainer) | _data(trainer) | _modelspec(trainer, run_info)
    meta |= trainer.base.family.metadata(trainer.base, trainer.config)  # ss_v2, ss_clip_skip, the architecture
    return {key: str(value) for key, value in meta.items()}


def _run(trainer: Trainer, epoch: int, run_info: dict[str, str]) -> dict[str, Any]:
    """Which run, model and network."""
    config, base = trainer.config, trainer.base
    return {
        "ss_session_id": run_info["session_id"],
        "ss_training_started_at": run_info["started_at"],
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": trainer.layout.token,
        "ss_sd_model_name": Path(base.spec).name if Path(base.spec).exists() else base.spec,
        "ss_base_model_version": base.version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": trainer.network.rank,
        "ss_network_alpha": trainer.network.alpha,
        "ss_network_dropout": None,
        "ss_num_epochs": config.max_train_epochs,
        "ss_epoch": epoch,
        "ss_seed": config.seed,
        "ss_training_comment": config.training_comment
        or f"subject-lora; network_weights: {run_info.get('network_weights') or 'None'}",
    }


def _optimisation(trainer: Trainer) -> dict[str, Any]:
    """How it was optimised: what the trainer really used (optimizer class, precision, steps)."""
    config = trainer.config
    optimizer = type(trainer.optimizer)
    args = format_optimizer_args(config.optimizer_args)
    trains_text = any(t.component != "unet" for t in trainer.network.targets)
    return {
        "ss_learning_rate": config.unet_lr,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr if trains_text else None,
        "ss_optimizer": f"{optimizer.__module__}.{optimizer.__name__}" + (f"({args})" if args else ""),
        "ss_lr_scheduler": config.lr_scheduler.value,
        "ss_lr_warmup_steps": round(trainer.total_steps * config.lr_warmup / 100),
        "ss_max_train_steps": trainer.total_steps,
        "ss_steps": trainer.global_step,  # optimizer steps
        "ss_num_batches_per_epoch": trainer.batches_per_epoch,  # micro-batches, as kohya counts them
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size * config.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": bool(trainer.base.unet.is_gradient_checkpointing),
        "ss_mixed_precision": trainer.precision.name,  # what was used, after any fallback
        "ss_full_fp16": False,
        "ss_noise_offset": config.noise_offset or None,
        "ss_min_snr_gamma": config.min_snr_gamma or None,
    }


def _data(trainer: Trainer) -> dict[str, Any]:
    """What it was trained on: folders, repeats, buckets, captions, augmentation."""
    config = trainer.config
    folders: dict[str, dict[str, int]] = {}
    buckets: dict[str, int] = {}
    for item in trainer.items:
        entry = folders.setdefault(Path(item.assignment.image).parent.name, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
        label = f"{item.assignment.bucket_width}x{item.assignment.bucket_height}"
        buckets[label] = buckets.get(label, 0) + 1
    return {
        "ss_num_train_images": sum(item.repeats for item in trainer.items),
        "ss_num_reg_images": 0,
        "ss_resolution": (config.resolution, config.resolution),
        "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": trainer.latents.cache,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": trainer.latents.flip,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_dataset_dirs": json.dumps(folders),
        "ss_tag_frequency": tag_frequency_by_folder(trainer.items),
        # sd-scripts' held-out split; the seed that chose it (None: nothing held out).
        "ss_validation_split": config.validation_split,
        "ss_validation_seed": config.split_seed if trainer.heldout else None,
    }


def _modelspec(trainer: Trainer, run_info: dict[str, str]) -> dict[str, Any]:
    resolution = trainer.config.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": trainer.layout.token,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": run_info.get("date", ""),
    }


def tag_frequency_by_folder(items: list[TrainItem]) -> str:
    """`ss_tag_frequency` over the training folders, as sd-scripts counts it."""
    merged: dict[str, dict[str, int]] = {}
    for item in items:
        folder = Path(item.assignment.image).parent.name
        counts = json.loads(tag_frequency([item.caption], folder))[folder]
        for tag, n in counts.items():
            merged.setdefault(folder, {})[tag] = merged.setdefault(folder, {}).get(tag, 0) + n
    return json.dumps(merged)
