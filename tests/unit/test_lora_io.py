"""kohya-format LoRA files: module counts and names, tensors, metadata, and loading them elsewhere."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch

from lora_core.families.loading import load_base_model
from lora_core.foundation.lora_file import LoraFileError, model_hash, read_lora, save_lora, tag_frequency
from lora_core.foundation.tiny_models import materialize
from lora_core.training.network import LoraNetwork

TINY_SD15 = "builtin:tiny-sd15"
TINY_SDXL = "builtin:tiny-sdxl"


def _randomise(network: LoraNetwork, seed: int = 0) -> None:
    """Non-zero lora_up, as after training (a fresh network is an exact no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _counts(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        prefix = name.split("_")[0] + "_" + name.split("_")[1]
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def test_sd15_network_has_kohyas_modules_and_names(builtin_models_home):
    base = load_base_model(TINY_SD15)
    network = LoraNetwork(base, rank=4, alpha=2)
    names = [t.name for t in network.targets]
    assert _counts(names) == {"lora_unet": 192, "lora_te": 72}
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # a 1x1 conv, as kohya targets
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in names
    down, up = network.weights()["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert down.shape[:2] == (4, 32) and down.shape[2:] == (1, 1) and up.shape == (32, 4, 1, 1)
    assert torch.count_nonzero(up) == 0 and torch.count_nonzero(down) > 0  # kohya's init


def test_sdxl_network_has_kohyas_modules_and_stability_names(builtin_models_home):
    base = load_base_model(TINY_SDXL)
    assert base.family.name == "sdxl" and base.version == "sdxl_base_v1-0"
    names = [t.name for t in LoraNetwork(base, rank=4, alpha=2).targets]
    assert _counts(names) == {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj" in names
    assert "lora_unet_output_blocks_5_1_proj_out" in names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)


def test_unet_only_network(builtin_models_home):
    network = LoraNetwork(load_base_model(TINY_SD15), rank=4, alpha=4, train_text_encoder=False)
    assert _counts(t.name for t in network.targets) == {"lora_unet": 192}


def test_saved_file_has_kohyas_tensors_metadata_and_hash(builtin_models_home, tmp_path):
    network = LoraNetwork(load_base_model(TINY_SD15), rank=4, alpha=2)
    _randomise(network)
    path = tmp_path / "t0k3n-000001.safetensors"
    meta = save_lora(path, network.weights(), alpha=2, metadata={"ss_network_dim": 4, "ss_network_alpha": 2.0})
    lora = read_lora(path)
    assert len(lora.modules) == 264 and lora.rank == 4
    assert all(alpha == 2.0 for _, _, alpha in lora.modules.values())
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        alpha = handle.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")
        assert alpha.shape == () and alpha.dtype == torch.float16
        assert handle.metadata()["ss_network_alpha"] == "2.0" and handle.metadata()["ss_network_dim"] == "4"
    assert meta["sshs_model_hash"] == model_hash(path)
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(path.read_bytes()[8 + header :]).hexdigest()


def _diffusers_load(base, path, caplog):
    pipeline = base.family.pipeline_class().from_pretrained(str(materialize(base.spec)))
    generator = torch.Generator().manual_seed(0)
    size = 128 if base.family.name == "sdxl" else 64
    before = pipeline(
        "t0k3n, a man", num_inference_steps=2, height=size, width=size, generator=generator, output_type="np"
    ).images
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()  # so caplog sees what diffusers warns about unused keys
    try:
        with caplog.at_level(logging.WARNING):
            pipeline.load_lora_weights(str(path))
    finally:
        diffusers_logging.disable_propagation()
    generator = torch.Generator().manual_seed(0)
    after = pipeline(
        "t0k3n, a man", num_inference_steps=2, height=size, width=size, generator=generator, output_type="np"
    ).images
    return pipeline, before, after


@pytest.mark.parametrize("spec", [TINY_SD15, TINY_SDXL])
def test_diffusers_loads_every_key_and_the_output_changes(builtin_models_home, tmp_path, caplog, spec):
    from peft.tuners.lora import LoraLayer

    base = load_base_model(spec)
    network = LoraNetwork(base, rank=4, alpha=2)
    _randomise(network)
    path = tmp_path / "lora.safetensors"
    save_lora(path, network.weights(), alpha=2, metadata={})
    pipeline, before, after = _diffusers_load(base, path, caplog)
    assert "unexpected" not in caplog.text.lower() and "not loaded" not in caplog.text.lower()
    layers = {
        name: sum(isinstance(m, LoraLayer) for m in part.modules())
        for name, part in pipeline.components.items()
        if isinstance(part, torch.nn.Module)
    }
    expected = (
        {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
        if base.family.name == "sdxl"
        else {"unet": 192, "text_encoder": 72}
    )
    assert {k: v for k, v in layers.items() if v} == expected
    assert abs(before - after).max() > 1e-3


def test_a_network_loads_its_own_file_and_a_rescaled_one(builtin_models_home, tmp_path):
    base = load_base_model(TINY_SD15)
    source = LoraNetwork(base, rank=4, alpha=2)
    _randomise(source, seed=1)
    path = tmp_path / "a.safetensors"
    save_lora(path, source.weights(), alpha=2, metadata={}, dtype=torch.float32)
    target = LoraNetwork(load_base_model(TINY_SD15), rank=4, alpha=4)  # another alpha: rescaled into up
    report = target.load(read_lora(path))
    assert report.loaded == 264 and report.missing == [] and report.unexpected == []
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    (d1, u1), (d2, u2) = source.weights()[name], target.weights()[name]
    assert torch.allclose(2 / 4 * u1 @ d1, 4 / 4 * u2 @ d2, atol=1e-6)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"model.diffusion_model.x.weight": torch.zeros(1)}, "is not LoRA"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, "no lora_up"),
        ({}, "no LoRA modules"),
    ],
)
def test_bad_lora_files_are_named(tmp_path, tensors, message):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraFileError, match=message):
        read_lora(path)


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoraFileError, match=r"only \.safetensors"):
        read_lora(path)


def test_tag_frequency_counts_as_sd_scripts_does():
    text = tag_frequency(["t0k3n, A man, smiling", "t0k3n, a man ,  "], "80_t0k3n")
    assert json.loads(text) == {"80_t0k3n": {"t0k3n": 2, "a man": 2, "smiling": 1}}


def test_the_unused_key_check_can_fail(builtin_models_home, tmp_path, caplog):
    """The check above would see a key diffusers cannot place: a module that does not exist."""
    base = load_base_model(TINY_SD15)
    network = LoraNetwork(base, rank=4, alpha=2)
    weights = network.weights()
    weights["lora_unet_down_blocks_0_attentions_0_bogus_layer"] = weights[
        "lora_unet_down_blocks_0_attentions_0_proj_in"
    ]
    path = tmp_path / "bogus.safetensors"
    save_lora(path, weights, alpha=2, metadata={})
    _diffusers_load(base, path, caplog)
    assert "unexpected" in caplog.text.lower()
