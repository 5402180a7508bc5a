"""Samples: fixed prompts and seeds on the trainer's own models, without disturbing training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import ImageChops

from lora_core.config.lora_config import Sampler
from lora_core.config.settings import SelectionSettings
from lora_core.evaluation.metric_grids import grid_key, metric_spec
from lora_core.families.loading import load_base_model
from lora_core.training.precision import Precision
from lora_core.training.sampling import (
    DEFAULT_PROMPTS,
    SCHEDULERS,
    SamplePrompt,
    SampleSpec,
    contact_sheet,
    render,
    sample_filename,
    save_samples,
)
from lora_core.training.trainer import Trainer
from tests.unit.test_training import TINY_SD15, make_subject, small_config

SPEC = SampleSpec(
    tuple(SamplePrompt(text, width=64, height=64, steps=3) for text in ("t0k3n, portrait photo", "t0k3n, oil painting"))
)
FP32 = Precision(torch.device("cpu"))  # what a trainer on the CPU without an explicit device uses

# sd-scripts' `sample_sampler` names and the diffusers schedulers it samples with (train_util.get_my_scheduler).
SD_SCRIPTS = {
    "ddim": ("DDIMScheduler", None),
    "pndm": ("PNDMScheduler", None),
    "lms": ("LMSDiscreteScheduler", None),
    "k_lms": ("LMSDiscreteScheduler", None),
    "euler": ("EulerDiscreteScheduler", None),
    "k_euler": ("EulerDiscreteScheduler", None),
    "euler_a": ("EulerAncestralDiscreteScheduler", None),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", None),
    "heun": ("HeunDiscreteScheduler", None),
    "dpm_2": ("KDPM2DiscreteScheduler", None),
    "k_dpm_2": ("KDPM2DiscreteScheduler", None),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", None),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", None),
    "dpmsolver": ("DPMSolverMultistepScheduler", "dpmsolver"),
    "dpmsolver++": ("DPMSolverMultistepScheduler", "dpmsolver++"),
    "dpmsingle": ("DPMSolverSinglestepScheduler", None),
}
TINY = SampleSpec((SamplePrompt("t0k3n, portrait photo", width=64, height=64, steps=2, seeds=(1,)),))


def differs(a, b) -> bool:
    return ImageChops.difference(a, b).getbbox() is not None


@pytest.fixture(scope="module")
def trainer(builtin_models_home, tmp_path_factory):
    config = small_config(num_repeats=2, max_train_epochs=3)
    layout = make_subject(tmp_path_factory.mktemp("sampling"), config, sizes=((256, 320), (320, 256)))
    return Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)


def test_the_same_seeds_give_the_same_pictures_and_the_modes_are_restored(trainer):
    trainer.base.unet.train()  # as in the middle of an epoch: rendering must leave it so
    modes = [module.training for module in trainer.base.components.values()]
    rng = torch.get_rng_state()
    first = render(trainer.base, SPEC, FP32)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG is as training left it"
    again = render(trainer.base, SPEC, FP32)
    assert [len(row) for row in first] == [2, 2] and first[0][0].size == (64, 64)
    pairs = [(a, b) for row_a, row_b in zip(first, again, strict=True) for a, b in zip(row_a, row_b, strict=True)]
    assert not any(differs(a, b) for a, b in pairs)
    assert differs(first[0][0], first[0][1]), "another seed, another picture"
    assert differs(first[0][0], first[1][0]), "another prompt, another picture"
    assert [module.training for module in trainer.base.components.values()] == modes


def test_the_lora_changes_the_samples(trainer):
    before = render(trainer.base, SPEC, FP32)[0][0]
    saved = {name: up.detach().clone() for name, (_, up) in trainer.network.weights().items()}
    with torch.no_grad():
        for _, up in trainer.network.weights().values():
            up.add_(0.05)
    after = render(trainer.base, SPEC, FP32)[0][0]
    with torch.no_grad():
        for name, (_, up) in trainer.network.weights().items():
            up.copy_(saved[name])
    assert differs(before, after)


def test_sampling_between_epochs_leaves_training_exactly_as_without(builtin_models_home, tmp_path):
    config = small_config(num_repeats=2, max_train_epochs=2)
    layout = make_subject(tmp_path, config, sizes=((256, 320), (320, 256)))
    plain = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    sampled = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    torch.manual_seed(1234)
    plain.run_epoch(1)
    plain.run_epoch(2)
    torch.manual_seed(1234)
    sampled.run_epoch(1, on_step=lambda *step: render(sampled.base, SPEC, FP32))  # mid-epoch, as every n steps
    render(sampled.base, SPEC, FP32)  # and at the epoch's end
    sampled.run_epoch(2)
    a, b = plain.network.weights(), sampled.network.weights()
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_files_are_named_as_sd_scripts_names_them(tmp_path, trainer):
    grid = render(trainer.base, SPEC, FP32)
    paths = save_samples(tmp_path / "sample", "t0k3n", SPEC, grid, epoch=3)
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    assert all(re.fullmatch(r"t0k3n_e000003_0[01]_\d{14}_[12]\.png", p.name) for p in paths)
    assert re.fullmatch(r"t0k3n_000100_02_\d{14}_7\.png", sample_filename("t0k3n", 2, 7, step=100))
    with pytest.raises(ValueError):
        sample_filename("t0k3n", 0, 1)


def test_a_contact_sheet_holds_every_prompt_and_seed(trainer):
    grid = render(trainer.base, SPEC, FP32)
    sheet = contact_sheet(grid, SPEC, title="epoch 1", cell=64)
    assert sheet.size == (2 * 64, 18 + 2 * (64 + 18))
    cell = np.asarray(sheet)[18 + 18 : 18 + 18 + 64, 0:64]
    assert np.array_equal(cell, np.asarray(grid[0][0].convert("RGB")))


def test_prompts_come_from_the_config_with_the_token_and_kohyas_options():
    config = small_config(
        sample_prompts="{token}, portrait photo\n\n{token} at the beach --n ugly, blurry --w 300 --s 5 --d 7"
    )
    first, second = SampleSpec.from_config(config, "s1lv10", steps=9).prompts
    assert first == SamplePrompt("s1lv10, portrait photo", width=256, height=256, steps=9)
    assert second == SamplePrompt(
        "s1lv10 at the beach", negative="ugly, blurry", width=296, height=256, steps=5, seeds=(7,)
    )
    assert [p.text for p in SampleSpec.from_config(small_config(sample_prompts=""), "x").prompts] == [
        p.replace("{token}", "x") for p in DEFAULT_PROMPTS
    ]
    with pytest.raises(ValueError, match="--s needs a number"):
        SamplePrompt.parse("a photo --s many")
    assert SamplePrompt.parse("t0k3n --with-dashes--in text").text == "t0k3n --with-dashes--in text"


def test_the_sampler_comes_from_the_config():
    assert SampleSpec.from_config(small_config(), "x").sampler == Sampler.euler_a
    spec = SampleSpec.from_config(small_config(sample_sampler="dpmsolver++"), "x")
    assert spec.sampler == Sampler.dpmsolver_pp
    assert SampleSpec(spec.prompts, "k_euler").sampler == Sampler.k_euler
    with pytest.raises(ValueError):
        SampleSpec(spec.prompts, "karras")


def test_metric_grids_use_the_runs_sampler_and_are_keyed_by_it():
    settings = SelectionSettings()
    assert metric_spec(settings, "t", "person", 512).sampler == Sampler.euler_a
    heun = metric_spec(settings, "t", "person", 512, sampler="heun")
    assert heun.sampler == Sampler.heun
    assert grid_key(heun, "base", "abc") != grid_key(metric_spec(settings, "t", "person", 512), "base", "abc")


@pytest.fixture(scope="module")
def sd15(builtin_models_home):
    return load_base_model(TINY_SD15)


@pytest.fixture
def used(monkeypatch, sd15) -> dict[str, list]:
    """The scheduler each render's pipeline ran with, and whether each decoded picture was finite."""
    from diffusers import StableDiffusionPipeline

    seen: dict[str, list] = {"schedulers": [], "finite": []}
    real_call, real_decode = StableDiffusionPipeline.__call__, sd15.vae.decode

    def call(self, *args, **kwargs):
        seen["schedulers"].append(self.scheduler)
        return real_call(self, *args, **kwargs)

    def decode(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        seen["finite"].append(bool(torch.isfinite(out[0] if isinstance(out, tuple) else out.sample).all()))
        return out

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    monkeypatch.setattr(sd15.vae, "decode", decode)
    return seen


@pytest.mark.filterwarnings("ignore:.*algorithm_types? .?dpmsolver:FutureWarning")  # kept: sd-scripts offers it
# The k-diffusion schedulers call np.log on tensors a thousand times per render; numpy 2 warns each time.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.parametrize("sampler", list(Sampler))
def test_every_sampler_renders_with_sd_scripts_scheduler(sd15, used, sampler):
    assert set(SCHEDULERS) == set(Sampler) and set(SD_SCRIPTS) == {str(s) for s in Sampler}
    grid = render(sd15, SampleSpec(TINY.prompts, sampler), FP32)
    name, algorithm = SD_SCRIPTS[str(sampler)]
    (scheduler,) = used["schedulers"]
    assert type(scheduler).__name__ == name
    assert algorithm is None or scheduler.config.algorithm_type == algorithm
    assert scheduler.config.prediction_type == sd15.noise_scheduler.config.prediction_type, "the model's schedule"
    assert used["finite"] == [True]
    assert np.asarray(grid[0][0]).std() > 0, "a picture, not a flat (NaN) one"


def test_euler_and_euler_a_draw_different_pictures(sd15):
    euler = render(sd15, SampleSpec(TINY.prompts, "euler"), FP32)[0][0]
    ancestral = render(sd15, SampleSpec(TINY.prompts, "euler_a"), FP32)[0][0]
    assert differs(euler, ancestral)
    assert not differs(euler, render(sd15, SampleSpec(TINY.prompts, "k_euler"), FP32)[0][0]), "k_euler is euler"
