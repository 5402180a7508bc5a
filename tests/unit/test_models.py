"""Loading the base model: every kind of source, and failing clearly and safely."""

from __future__ import annotations

import os
import pickle
import re
import time

import pytest

from lora_core.families.loading import BaseModelError, load_base_model, model_identity
from lora_core.foundation.tiny_models import materialize


class _Payload:
    """A pickle that would run a command when loaded: what a hostile .ckpt carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_ckpt_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}))
    with pytest.raises(BaseModelError, match="Unable to load weights"):  # torch's weights_only loader refused it
        load_base_model(str(ckpt))
    assert not marker.exists()


def test_a_local_diffusers_folder_loads_and_sdxl_is_detected(builtin_models_home):
    folder = materialize("builtin:tiny-sdxl")
    base = load_base_model(str(folder))
    assert base.family.name == "sdxl" and len(base.text_encoders) == 2
    with pytest.raises(BaseModelError, match="is SDXL, but the config says model_family=sd15"):
        load_base_model(str(folder), family="sd15")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "no base model: pass `--base-model MODEL`"),
        ("./nowhere", "no such file or folder"),
        ("x.bin", "no such file"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(BaseModelError, match=message):
        load_base_model(spec)


def test_a_folder_that_is_not_a_diffusers_model_is_named(tmp_path):
    with pytest.raises(BaseModelError, match=r"no model_index\.json"):
        load_base_model(str(tmp_path))


def test_an_unreachable_hub_id_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(BaseModelError) as caught:
        load_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.monotonic() - start < 20
    assert "--base-model DIR" in str(caught.value) and "hf download" in str(caught.value)


def test_identity_changes_with_the_file(tmp_path):
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(b"1")
    before = model_identity(str(checkpoint))
    time.sleep(0.01)
    checkpoint.write_bytes(b"22")
    assert model_identity(str(checkpoint)) != before
    assert model_identity("org/repo") == "org/repo"


def test_a_single_file_checkpoint_loads_with_its_config(builtin_models_home, tmp_path):
    """A CivitAI-style single .safetensors (original layout) gives exactly the folder's weights."""
    import torch

    from lora_core.training.network import LoraNetwork
    from tests.ldm_checkpoint import write_single_file

    checkpoint = tmp_path / "tiny-sd15.safetensors"
    write_single_file(materialize("builtin:tiny-sd15"), checkpoint)
    single = load_base_model(str(checkpoint), config_folder="builtin:tiny-sd15")  # its family from its tensors
    folder = load_base_model("builtin:tiny-sd15")
    assert single.family.name == folder.family.name == "sd15"
    for name in ("unet", "text_encoder"):
        a, b = folder.components[name].state_dict(), single.components[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(v, single.vae.state_dict()[k]) for k, v in folder.vae.state_dict().items())
    assert len(LoraNetwork(single, rank=4, alpha=4).targets) == 264


def test_a_single_file_without_its_config_says_what_to_pass(builtin_models_home, tmp_path, monkeypatch):
    from tests.ldm_checkpoint import write_single_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    checkpoint = tmp_path / "model.safetensors"
    write_single_file(materialize("builtin:tiny-sd15"), checkpoint)
    with pytest.raises(BaseModelError, match="--base-model-config"):
        load_base_model(str(checkpoint))


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x.weight"], "SD1.x/2.x"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.x.weight"], "SDXL"),
    ],
)
def test_a_single_file_is_recognised_from_its_tensor_names_before_loading(tmp_path, keys, found):
    """A checkpoint whose tensors say one family, given to a run of the other, is refused from its header."""
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, checkpoint)
    other = "sdxl" if found == "SD1.x/2.x" else "sd15"
    with pytest.raises(BaseModelError, match=rf"is {re.escape(found)}, but the config says model_family={other}"):
        load_base_model(str(checkpoint), family=other)


def test_a_hub_id_of_another_family_is_refused_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BaseModelError, match="is SDXL, but the config says model_family=sd15"):
        load_base_model("stabilityai/stable-diffusion-xl-base-1.0", family="sd15")


def test_an_unknown_family_lists_the_registered_ones():
    from lora_core.config.lora_config import ConfigError
    from lora_core.families import FAMILIES

    with pytest.raises(ConfigError, match=", ".join(FAMILIES)):
        load_base_model("builtin:tiny-sd15", family="sd3")


def test_a_lora_names_its_family_in_its_metadata():
    from lora_core.families import family_of_lora

    assert family_of_lora({"ss_base_model_version": "sdxl_base_v1-0"}).name == "sdxl"
    assert family_of_lora({"ss_base_model_version": "sd_v1"}).name == "sd15"
    assert family_of_lora({"ss_base_model_version": "sd_v2_v"}).name == "sd15"
    assert family_of_lora({}) is None
