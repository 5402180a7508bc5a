"""The FLUX.1 benches on tiny models: the plain loop sees exactly our inputs and stores the base as ours does,
the full-size transformer is FLUX.1-dev's, and bench.gpu's FLUX path runs end to end on the CPU."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: tiny steps on a busy 2-core machine slow down manyfold with two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_full_size_transformer_is_flux_dev_and_builds_the_same_weights_from_a_seed():
    from diffusers import FluxTransformer2DModel

    from bench.models import ARCHITECTURES, build_transformer, fingerprint

    with torch.device("meta"):  # no memory: FLUX.1-dev's published config
        full = FluxTransformer2DModel(**ARCHITECTURES["flux"].unet)
    assert len(full.transformer_blocks) == 19 and len(full.single_transformer_blocks) == 38
    assert 11.8e9 < sum(p.numel() for p in full.parameters()) < 12.0e9
    tiny = ARCHITECTURES["flux-tiny"]
    first, again, other = (build_transformer(tiny, seed) for seed in (0, 0, 1))
    assert all(torch.isfinite(p).all() for p in first.parameters())
    assert fingerprint(first) == fingerprint(again) != fingerprint(other)


@pytest.mark.parametrize("storage", ["fp8_base", "nf4_base"])
def test_the_plain_flux_loop_sees_our_inputs_and_stores_the_base_as_ours(one_thread, tmp_path, storage):
    import bitsandbytes as bnb

    from bench.bare_flux import BareFluxLoop, plain_inputs, plain_loop
    from bench.models import ARCHITECTURES, build_base
    from bench.subject import make_subject
    from bench.train_step import bench_config
    from lora_core.families.family import TextCondition
    from lora_core.training.trainer import Trainer

    # fp32 compute (the CPU bench's default): our text cache is then computed exactly as the plain way's
    args = argparse.Namespace(family="flux", rank=4, precision="no", rounds=1, set=[f"{storage}=true"])
    config = bench_config(args)
    layout = make_subject(tmp_path, config, 64, 2, repeats=2)
    ours, theirs = build_base(ARCHITECTURES["flux-tiny"]), build_base(ARCHITECTURES["flux-tiny"])
    inputs = plain_inputs(theirs, layout, "cpu", config)
    trainer = Trainer(config, ours, layout, device="cpu", show_progress=False)
    text = TextCondition.cat(trainer.text)
    assert torch.equal(text.hidden, inputs.hidden) and torch.equal(text.pooled, inputs.pooled)
    cached = torch.stack([trainer.latents.cached[i][False] for i in range(len(trainer.items))])
    assert torch.allclose(cached, inputs.latents, atol=1e-5)

    bare = plain_loop(theirs, inputs, config, precision="no", device="cpu")
    assert isinstance(bare, BareFluxLoop)

    def stored(transformer: torch.nn.Module) -> tuple[str, str]:
        layer = transformer.transformer_blocks[0].attn.to_q.base_layer
        return type(layer).__name__, str(layer.weight.dtype)

    assert stored(ours.unet) == stored(theirs.unet)
    assert isinstance(theirs.unet.transformer_blocks[0].attn.to_q.base_layer, bnb.nn.Linear4bit) == (
        storage == "nf4_base"
    )
    ours_lora = {n for n, _ in ours.unet.named_parameters() if ".lora_" in n}
    assert ours_lora == {n for n, _ in theirs.unet.named_parameters() if ".lora_" in n}
    assert all(math.isfinite(loss) for loss in bare.train(2))


def test_gpu_bench_smoke_runs_the_flux_cases(one_thread, tmp_path, monkeypatch):
    from bench import gpu

    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--smoke", "--cases", "flux-fp8", "flux-nf4", "--rounds", "1"]) == 0
    result = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert [(case["case"], case["base_storage"]) for case in result["cases"]] == [
        ("flux-fp8", "fp8"),
        ("flux-nf4", "nf4"),
    ]
    for case in result["cases"]:
        assert case["ours"]["losses_finite"] and case["bare"]["losses_finite"] and case["bare"]["same_weights"]
        assert math.isfinite(case["ratio"]) and case["ratio"] > 0
        assert case["sample_finite"] and case["resume"]["finite"] and case["resume"]["values_match"]
        assert case["boundary"]["lora_bytes"] > 0
    assert [case["text_tokens"] for case in result["cases"]] == [512, 256]  # flux-12gb's T5 reads 256


def test_train_step_bench_runs_flux(one_thread, tmp_path, monkeypatch, capsys):
    from bench import train_step

    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--family", "flux", "--model", "tiny", "--steps", "2", "--rounds", "1", "--resolution", "64"]
    assert train_step.main([*args, "--threads", "1"]) == 0
    result = json.loads((tmp_path / "bench-train-step.json").read_text())
    assert result["preset"] == "flux" and "FluxTransformer2DModel" in result["model"]
    assert result["ours"]["losses_finite"] and result["bare"]["losses_finite"]
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert "ratio ours/bare" in capsys.readouterr().out
