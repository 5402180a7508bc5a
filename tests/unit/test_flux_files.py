"""FLUX.1 from the single files users have (BFL's transformer, clip_l, t5xxl, ae), on the tiny FLUX, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.families import FAMILIES
from lora_core.families.flux import Flux
from lora_core.families.flux_files import FluxFileError, bfl_to_diffusers, load_pipeline
from lora_core.foundation.tiny_models import materialize
from tests.flux_checkpoint import to_bfl, to_ldm_vae, write_ae, write_clip_l, write_t5, write_transformer

OFFLINE = {"local_files_only": True}
COMFY = "model.diffusion_model."
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def folder(builtin_models_home) -> Path:
    return materialize("builtin:tiny-flux")


@pytest.fixture(scope="module")
def reference(folder):
    """The tiny FLUX as its folder loads: what every component loaded from a file is compared with."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder, **OFFLINE)


def other_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights unlike the folder's (seeded noise added), so a test can tell a part file's from the folder's."""
    generator = torch.Generator().manual_seed(1)
    return {k: v + torch.randn(v.shape, generator=generator) for k, v in state.items()}


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def wide_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny transformer's names with the single blocks' q/k/v and MLP-in as wide as FLUX.1's (3072, 12288
    rows: what diffusers' converter hard-codes), one column each, so its converter can run on them."""
    generator = torch.Generator().manual_seed(2)
    wide = {}
    for key, value in state.items():
        shape = list(value.shape)
        if key.startswith("single_transformer_blocks.") and any(p in key for p in ("to_q", "to_k", "to_v", "mlp")):
            shape = [12288 if "proj_mlp" in key else 3072] + [1] * (len(shape) - 1)
        wide[key] = torch.randn(shape, generator=generator)
    return wide


# -- the writers are the exact inverses of diffusers' converters --


def exactly(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_the_bfl_writer_inverts_diffusers_converter_at_flux_width(folder, prefix):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    wide = wide_transformer(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    bfl = {prefix + k: v for k, v in to_bfl(wide).items()}
    assert "double_blocks.0.img_attn.qkv.weight" in to_bfl(wide) and "final_layer.linear.weight" in to_bfl(wide)
    assert exactly(convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)), wide)
    # Ours reads it as diffusers' does, and also at any other width (diffusers' cannot: it assumes 3072).
    assert exactly(bfl_to_diffusers(to_bfl(wide), 3072), wide)


def test_the_tiny_transformer_round_trips_through_bfl_names(folder, tmp_path):
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    write_transformer(folder, tmp_path / "flux1-dev.safetensors")
    written = load_file(tmp_path / "flux1-dev.safetensors")
    assert {k for k in written if k.startswith("single_blocks.0.")} == {
        f"single_blocks.0.{name}"
        for name in (
            "linear1.weight",
            "linear1.bias",
            "linear2.weight",
            "linear2.bias",
            "modulation.lin.weight",
            "modulation.lin.bias",
            "norm.query_norm.scale",
            "norm.key_norm.scale",
        )
    }
    assert exactly(bfl_to_diffusers(written, 16), state)


def test_the_ae_writer_inverts_diffusers_ldm_vae_converter(folder, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "vae" / "config.json").read_text())
    write_ae(folder, tmp_path / "ae.safetensors")
    written = load_file(tmp_path / "ae.safetensors")
    assert exactly(written, to_ldm_vae(state, len(config["block_out_channels"])))
    assert "encoder.down.0.block.0.norm1.weight" in written and written["decoder.mid.attn_1.q.weight"].dim() == 4
    assert not any(k.startswith(("quant_conv", "post_quant_conv", "first_stage_model.")) for k in written)
    assert exactly(convert_ldm_vae_checkpoint(dict(written), config), state)


def test_the_text_encoder_files_have_comfyuis_names(folder, tmp_path):
    write_clip_l(folder, tmp_path / "clip_l.safetensors")
    write_t5(folder, tmp_path / "t5xxl_fp16.safetensors")
    clip, t5 = load_file(tmp_path / "clip_l.safetensors"), load_file(tmp_path / "t5xxl_fp16.safetensors")
    assert all(k.startswith("text_model.") for k in clip)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in clip
    assert "shared.weight" in t5 and "encoder.block.0.layer.0.SelfAttention.q.weight" in t5


# -- recognising the transformer file --


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_the_bfl_file_is_flux_and_no_sd_family(folder, tmp_path, prefix):
    from lora_core.families.family import read_checkpoint_keys

    write_transformer(folder, tmp_path / "flux1-dev.safetensors", prefix=prefix)
    keys = read_checkpoint_keys(tmp_path / "flux1-dev.safetensors")
    assert keys is not None
    assert Flux().recognises_checkpoint(keys)
    assert [name for name, family in FAMILIES.items() if family.recognises_checkpoint(keys)] == ["flux"]


# -- loading --


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_the_bfl_transformer_file_loads_with_the_folders_configs(folder, reference, tmp_path, prefix):
    path = tmp_path / "flux1-dev.safetensors"
    write_transformer(folder, path, prefix=prefix)
    pipeline = load_pipeline(str(path), "from_single_file", str(folder), {}, OFFLINE)
    for name in COMPONENTS:
        assert same(getattr(pipeline, name), getattr(reference, name)), name
    assert {p.dtype for p in pipeline.transformer.parameters()} == {torch.float32}
    assert not pipeline.transformer.training


@pytest.mark.parametrize("loader", ["from_single_file", "from_pretrained"])
def test_part_files_replace_their_components(folder, reference, tmp_path, loader):
    """Each part file's weights (unlike the folder's) are what its component holds; the rest is the folder's."""
    parts = {name: str(tmp_path / f"{name}.safetensors") for name in ("clip_l", "t5xxl", "ae")}
    write_clip_l(folder, Path(parts["clip_l"]), tweak=other_weights)
    write_t5(folder, Path(parts["t5xxl"]), tweak=other_weights)
    write_ae(folder, Path(parts["ae"]), tweak=other_weights)
    source = str(folder)
    if loader == "from_single_file":
        source = str(tmp_path / "flux1-dev.safetensors")
        write_transformer(folder, Path(source))
    pipeline = load_pipeline(source, loader, str(folder) if loader == "from_single_file" else None, parts, OFFLINE)

    assert same(pipeline.transformer, reference.transformer)
    files = {
        "text_encoder": other_weights(load_file(folder / "text_encoder" / "model.safetensors")),
        "text_encoder_2": other_weights(load_file(folder / "text_encoder_2" / "model.safetensors")),
        "vae": other_weights(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")),
    }
    for name, weights in files.items():
        loaded = getattr(pipeline, name).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items()), name
        assert not same(getattr(pipeline, name), getattr(reference, name)), name
        assert not getattr(pipeline, name).training, name
    t5 = pipeline.text_encoder_2
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # the file's one embedding, still tied


def test_an_fp8_t5_file_is_upcast(folder, tmp_path):
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    write_t5(folder, path, tweak=lambda state: {k: v.to(torch.float8_e4m3fn) for k, v in state.items()})
    pipeline = load_pipeline(str(folder), "from_pretrained", None, {"t5xxl": str(path)}, OFFLINE)
    loaded = pipeline.text_encoder_2.state_dict()
    assert {v.dtype for v in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], v.float()) for k, v in load_file(path).items())


def test_a_t5_file_with_only_the_encoders_embedding_loads(folder, reference, tmp_path):
    path = tmp_path / "t5.safetensors"
    save_file(
        {
            ("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
            for k, v in load_file(folder / "text_encoder_2" / "model.safetensors").items()
        },
        str(path),
    )
    pipeline = load_pipeline(str(folder), "from_pretrained", None, {"t5xxl": str(path)}, OFFLINE)
    assert same(pipeline.text_encoder_2, reference.text_encoder_2)


# -- files that do not fit --


def test_a_clip_l_file_with_wrong_keys_names_the_file_and_the_keys(folder, tmp_path):
    path = tmp_path / "my_clip.safetensors"
    renamed = {"encoder.layers.0.mlp.fc1.weight": "encoder.layers.0.mlp.dense.weight"}
    write_clip_l(folder, path, tweak=lambda state: {renamed.get(k, k): v for k, v in state.items()})
    with pytest.raises(FluxFileError) as caught:
        load_pipeline(str(folder), "from_pretrained", None, {"clip_l": str(path)}, OFFLINE)
    message = str(caught.value)
    assert str(path) in message and "clip_l" in message
    assert "1 missing (first: encoder.layers.0.mlp.fc1.weight)" in message
    assert "1 unexpected (first: encoder.layers.0.mlp.dense.weight)" in message


def test_a_t5_file_given_as_clip_l_is_refused(folder, tmp_path):
    path = tmp_path / "t5xxl_fp16.safetensors"
    write_t5(folder, path)
    with pytest.raises(FluxFileError, match=r"clip_l file .*t5xxl_fp16\.safetensors is not CLIP-L's"):
        load_pipeline(str(folder), "from_pretrained", None, {"clip_l": str(path)}, OFFLINE)


def test_a_schnell_file_with_a_dev_config_says_so(folder, tmp_path):
    path = tmp_path / "flux1-schnell.safetensors"
    write_transformer(folder, path, tweak=lambda s: {k: v for k, v in s.items() if "guidance_embedder" not in k})
    with pytest.raises(FluxFileError, match=r"4 missing .*FLUX\.1-schnell\?"):
        load_pipeline(str(path), "from_single_file", str(folder), {}, OFFLINE)


@pytest.mark.parametrize(("name", "why"), [("clip_l.bin", "want a .safetensors"), ("nope.safetensors", "no such")])
def test_a_part_that_is_not_a_safetensors_file_is_refused_unread(folder, tmp_path, name, why):
    path = tmp_path / name
    if path.suffix == ".bin":
        path.write_bytes(b"not read")
    with pytest.raises(FluxFileError, match=rf"ae file .*{name}: {why}"):
        load_pipeline(str(folder), "from_pretrained", None, {"ae": str(path)}, OFFLINE)


def test_a_dtype_option_loads_every_file_in_it(folder, tmp_path):
    transformer, clip = tmp_path / "flux1-dev.safetensors", tmp_path / "clip_l.safetensors"
    write_transformer(folder, transformer)
    write_clip_l(folder, clip)
    options = {**OFFLINE, "dtype": torch.bfloat16}
    pipeline = load_pipeline(str(transformer), "from_single_file", str(folder), {"clip_l": str(clip)}, options)
    assert {p.dtype for name in COMPONENTS for p in getattr(pipeline, name).parameters()} == {torch.bfloat16}
