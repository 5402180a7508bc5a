"""Every config field acts or is refused, and the metadata says what was done (not what was asked).

The walk is exhaustive: a field added to `LoraConfig` fails this module until
it has a probe here (a changed value must change what the trainer or a stage
does) or names the test elsewhere that shows its effect.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

import tests.flows.test_evaluation
import tests.flows.test_flow
import tests.flows.test_flux
import tests.unit.test_captioning
import tests.unit.test_crop
import tests.unit.test_ingest
import tests.unit.test_models
import tests.unit.test_orient
import tests.unit.test_training
from lora_core.config.lora_config import LoraConfig
from lora_core.dataset.buckets import BucketPlan
from lora_core.families.loading import BaseModelError, load_base_model
from lora_core.foundation.layout import repeats_for
from lora_core.foundation.lora_file import read_lora
from lora_core.training.metadata import kohya_metadata
from lora_core.training.optim import make_optimizer, make_scheduler, param_groups
from lora_core.training.sampling import SampleSpec
from lora_core.training.state import save_epoch, saves_lora
from lora_core.training.trainer import Trainer
from tests.unit.test_training import TINY_SD15, make_subject, small_config

SIZES = ((128, 160),) * 2  # one bucket: the batch size shows in the number of batches
INFO = {"session_id": "1", "started_at": "0"}


@pytest.fixture(scope="module")
def build(builtin_models_home, tmp_path_factory):
    """A trainer (or the error it refuses with) for a config, built once per distinct config."""
    built: dict[str, Any] = {}

    def make(config: LoraConfig) -> Trainer | Exception:
        key = config.model_dump_json()
        if key not in built:
            folder = tmp_path_factory.mktemp("field")
            try:
                layout = make_subject(folder, config, SIZES)
                base = load_base_model(config.pretrained_model_name_or_path or TINY_SD15, parts=config.component_files)
                built[key] = Trainer(config, base, layout, device="cpu")
            except (BaseModelError, FileNotFoundError) as error:
                built[key] = error
        return built[key]

    return make


def _loss(trainer: Trainer) -> float:
    """One micro-batch's loss with fixed draws: what the step computes from the config."""
    trainer.noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return round(float(trainer._loss([0, 0], random.Random(1))), 6)


def _lrs(config: LoraConfig) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizer, _ = make_optimizer(config, param_groups(config, params[:1], params[1:]), torch.device("cpu"))
    scheduler = make_scheduler(config, optimizer, 30)
    lrs = []
    for _ in range(30):
        lrs.append([round(lr, 9) for lr in scheduler.get_last_lr()])
        optimizer.step()
        scheduler.step()
    return lrs


def _optimizer(config: LoraConfig) -> tuple[str, dict]:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer, _ = make_optimizer(config, param_groups(config, params, []), torch.device("cpu"))
    return type(optimizer).__name__, {k: v for k, v in optimizer.defaults.items() if k == "weight_decay"}


def _trainer(probe):
    """A probe on the trainer a config builds (or the error it is refused with)."""

    def run(config: LoraConfig, build) -> Any:
        made = build(config)
        return f"{type(made).__name__}: {str(made)[:60]}" if isinstance(made, Exception) else probe(made)

    return run


def _pure(probe):
    return lambda config, build: probe(config)


def _saved_dtype(trainer: Trainer) -> str:
    trainer.epoch = 1
    path = save_epoch(trainer, "f" * 64, INFO)
    return str(next(iter(read_lora(path).modules.values()))[0].dtype)


def _latent_files(trainer: Trainer) -> int:
    return len(list(trainer.layout.training_images.rglob("*.latents.safetensors")))


FLUX = {"model_family": "flux", "pretrained_model_name_or_path": "builtin:tiny-flux", "min_snr_gamma": 0}
FLUX |= {"train_text_encoder": False}  # FLUX.1's text outputs cached, as its presets train


def _stored(trainer: Trainer) -> Any:
    """How the transformer keeps a frozen linear layer's weights."""
    return trainer.base.unet.transformer_blocks[0].attn.to_q.base_layer


PROBES: dict[str, tuple[Any, Any, dict]] = {
    # field: (changed value, probe(config, build) -> what it changes, base config updates)
    "model_family": ("sdxl", _trainer(lambda t: "trained"), {}),  # refused: the tiny model is SD1.5
    "v_parameterization": (True, _trainer(lambda t: (t.base.noise_scheduler.config.prediction_type, _loss(t))), {}),
    "network_dim": (4, _trainer(lambda t: tuple(t.network.parameters()[0].shape)), {}),
    "network_alpha": (1, _trainer(lambda t: t.network._layer(t.network.targets[0]).scaling["default"]), {}),
    "train_text_encoder": (False, _trainer(lambda t: sorted({x.component for x in t.network.targets})), {}),
    "unet_lr": (1e-3, _pure(_lrs), {}),
    "text_encoder_lr": (1e-3, _pure(_lrs), {}),
    "optimizer": ("Adafactor", _pure(_optimizer), {}),
    "optimizer_args": ({"weight_decay": 0.5}, _pure(_optimizer), {}),
    "lr_scheduler": ("linear", _pure(_lrs), {}),
    "lr_scheduler_num_cycles": (1, _pure(_lrs), {}),
    "lr_warmup": (20, _pure(_lrs), {}),
    "min_snr_gamma": (0.05, _trainer(_loss), {}),  # under the SNR of all but the noisiest steps
    "noise_offset": (0.3, _trainer(_loss), {}),
    "seed": (7, _trainer(lambda t: float(t.network.parameters()[0].sum())), {}),
    "resolution": (320, _pure(BucketPlan.from_config), {"max_bucket_reso": 512}),
    "enable_bucket": (False, _pure(BucketPlan.from_config), {}),
    "min_bucket_reso": (64, _pure(BucketPlan.from_config), {}),
    "max_bucket_reso": (768, _pure(BucketPlan.from_config), {}),
    "bucket_reso_steps": (32, _pure(BucketPlan.from_config), {}),
    "bucket_no_upscale": (False, _pure(BucketPlan.from_config), {}),
    "num_repeats": (3, _pure(lambda c: repeats_for(20, c.num_repeats)), {}),
    "flip_aug": (True, _trainer(lambda t: (sorted(t.latents.cached[0]), _loss(t))), {}),
    "shuffle_caption": (True, _trainer(lambda t: (t.text is None, _loss(t))), {}),
    "keep_tokens": (2, _trainer(_loss), {"shuffle_caption": True}),
    "caption_extension": (".caption", _trainer(lambda t: "trained"), {}),  # refused: no .caption files
    "max_token_length": (150, _trainer(lambda t: tuple(t.text[0].hidden.shape)), {"train_text_encoder": False}),
    "clip_skip": (2, _trainer(_loss), {}),
    "train_batch_size": (1, _trainer(lambda t: t.batches_per_epoch), {}),
    "max_train_epochs": (3, _trainer(lambda t: t.total_steps), {}),
    "gradient_accumulation_steps": (2, _trainer(lambda t: t.steps_per_epoch), {"train_batch_size": 1}),
    "gradient_checkpointing": (True, _trainer(lambda t: t.base.unet.is_gradient_checkpointing), {}),
    "mixed_precision": ("bf16", _trainer(lambda t: (t.precision.name, next(t.base.unet.parameters()).dtype)), {}),
    "save_precision": ("bf16", _trainer(_saved_dtype), {}),
    "cache_latents": (False, _trainer(lambda t: (t.latents.cache, _latent_files(t))), {}),
    "cache_latents_to_disk": (True, _trainer(_latent_files), {}),
    "save_every_n_epochs": (2, _pure(lambda c: [saves_lora(c, e, 3) for e in (1, 2, 3)]), {}),
    "sample_prompts": ("{token} at sea --w 64", _pure(lambda c: SampleSpec.from_config(c, "t")), {}),
    "sample_sampler": ("ddim", _pure(lambda c: SampleSpec.from_config(c, "t")), {}),
    "training_comment": ("hello", _trainer(lambda t: kohya_metadata(t, 1, INFO)["ss_training_comment"]), {}),
    # FLUX.1's own settings, on the tiny FLUX.1 model.
    "timestep_sampling": ("uniform", _trainer(_loss), FLUX),
    "sigmoid_scale": (2.0, _trainer(_loss), FLUX),
    "discrete_flow_shift": (1.0, _trainer(_loss), FLUX),
    "model_prediction_type": ("additive", _trainer(_loss), FLUX),
    "guidance_scale": (3.5, _trainer(_loss), FLUX),
    "t5xxl_max_token_length": (64, _trainer(lambda t: tuple(t.text[0].hidden.shape)), FLUX),
    "apply_t5_attn_mask": (True, _trainer(lambda t: round(float(t.text[0].hidden.abs().sum()), 4)), FLUX),
    "fp8_base": (True, _trainer(lambda t: str(_stored(t).weight.dtype)), FLUX),
    "nf4_base": (True, _trainer(lambda t: type(_stored(t)).__name__), FLUX),
}

# Fields whose effect a stage's own tests show, end to end.
ELSEWHERE = {
    "pretrained_model_name_or_path": tests.unit.test_models.test_a_local_diffusers_folder_loads_and_sdxl_is_detected,
    "network_weights": tests.unit.test_training.test_a_kohya_lora_continues_through_the_flow_and_sdxl_runs_end_to_end,
    "sample_every_n_steps": tests.unit.test_training.test_the_train_stage_caches_each_epoch_and_publishes_it,
    "sample_every_n_epochs": tests.unit.test_training.test_the_train_stage_caches_each_epoch_and_publishes_it,
    "subject_type": tests.unit.test_crop.test_an_object_gets_image_checks_only,
    "ingest": tests.unit.test_ingest.test_too_few_images_fails_with_every_reason,
    "checks": tests.unit.test_orient.test_mirrored_crops_are_flagged_fixed_or_rejected_by_policy,
    "captioning": tests.unit.test_captioning.test_captions_made_with_other_settings_are_not_intact,
    "selection": tests.flows.test_evaluation.test_an_undertrained_run_resumes_from_its_last_epoch_and_selects_again,
    # Held-out images need more than the probes' two photos: a split of two would be refused.
    "validation_split": tests.unit.test_training.test_held_out_images_are_never_trained_on_and_their_loss_is_measured,
    "validation_seed": tests.unit.test_training.test_held_out_images_are_never_trained_on_and_their_loss_is_measured,
    "logging_dir": tests.unit.test_training.test_logging_dir_writes_tensorboard_events_of_every_step_and_epoch,
    "clip_l": tests.flows.test_flux.test_single_files_and_their_parts_load_from_the_config_fields,
    "t5xxl": tests.flows.test_flux.test_single_files_and_their_parts_load_from_the_config_fields,
    "ae": tests.flows.test_flux.test_single_files_and_their_parts_load_from_the_config_fields,
}

REFUSED = {"model_family", "caption_extension"}


def test_every_field_is_walked():
    assert set(PROBES) | set(ELSEWHERE) == set(LoraConfig.model_fields)
    assert not set(PROBES) & set(ELSEWHERE)
    assert all(callable(test) and test.__name__.startswith("test_") for test in ELSEWHERE.values())
    assert tests.flows.test_flow  # (imported so a renamed stage test fails here, not silently)


@pytest.mark.parametrize("field", sorted(PROBES))
def test_a_changed_field_changes_what_is_done(field, build):
    value, probe, base_updates = PROBES[field]
    base = small_config(num_repeats=1, mixed_precision="no", **base_updates)
    changed = LoraConfig.model_validate(base.model_dump() | {field: value})
    assert getattr(changed, field) != getattr(base, field), "the probe's value is the default"
    before, after = probe(base, build), probe(changed, build)
    assert before != after, f"{field}={value!r} changed nothing ({before!r})"
    refused = [str(probe).startswith(("BaseModelError", "FileNotFoundError")) for probe in (before, after)]
    # A refusal is a change only where refusing is the field's effect; a crash is never one.
    assert refused == [False, field in REFUSED], (before, after)


@pytest.mark.parametrize("field", ["mixed_precision", "cache_latents", "flip_aug", "train_text_encoder", "clip_skip"])
def test_the_metadata_says_what_the_trainer_did(field, build):
    value, _, base_updates = PROBES[field]
    base = small_config(num_repeats=1, mixed_precision="no", **base_updates)
    for config in (base, LoraConfig.model_validate(base.model_dump() | {field: value})):
        trainer = build(config)
        meta = kohya_metadata(trainer, 1, INFO)
        text_targets = [t for t in trainer.network.targets if t.component != "unet"]
        assert meta["ss_mixed_precision"] == trainer.precision.name
        assert meta["ss_cache_latents"] == str(trainer.latents.cache)
        assert meta["ss_flip_aug"] == str(trainer.latents.flip)
        assert (meta["ss_text_encoder_lr"] == "None") == (not text_targets)
        assert meta["ss_gradient_checkpointing"] == str(trainer.base.unet.is_gradient_checkpointing)
        assert meta["ss_clip_skip"] == str(trainer.conditioning.clip_skip)
        optimizer = type(trainer.optimizer)
        assert meta["ss_optimizer"].startswith(f"{optimizer.__module__}.{optimizer.__name__}")
        assert meta["ss_num_batches_per_epoch"] == str(trainer.batches_per_epoch)
        assert json.loads(meta["ss_dataset_dirs"])  # the folders trained on


def test_flipped_latents_are_the_mirrored_image(build):
    """flip_aug caches the mirror image's latents, and the epoch's draws pick them about half the time."""
    import numpy as np
    from PIL import Image, ImageOps

    from lora_core.dataset.buckets import apply_bucket

    trainer = build(small_config(num_repeats=1, mixed_precision="no", flip_aug=True))
    item = trainer.items[0]
    with Image.open(trainer.layout.root / item.assignment.image) as image:
        mirrored = ImageOps.mirror(apply_bucket(image.convert("RGB"), item.assignment))
    pixels = torch.from_numpy(np.asarray(mirrored, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.allclose(trainer.latents.cached[0][True], trainer.latents._encode(pixels[None])[0], atol=1e-5)
    assert not torch.allclose(trainer.latents.cached[0][True], trainer.latents.cached[0][False])


def test_uncached_latents_are_encoded_at_every_step(build, monkeypatch):
    trainer = build(small_config(num_repeats=1, mixed_precision="no", cache_latents=False))
    calls = []
    real = trainer.base.vae.encode
    monkeypatch.setattr(trainer.base.vae, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    _loss(trainer)
    _loss(trainer)
    assert len(calls) == 2 and trainer.latents.cached == []
