"""FLUX.1 LoRA keys: diffusers' module tree to kohya's fused BFL names and back, checked against the loaders.

The fold of q/k/v (and a single block's q/k/v/mlp) into one LoRA is checked on
real Linear layers; the names against diffusers' own converters (its kohya
FLUX LoRA converter and its single-file BFL checkpoint converter) and
ComfyUI's key rule, on the full-size FLUX.1-dev architecture built on the meta
device (no weights, nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lora_core.families.flux_keys import (
    FUSED_PARTS,
    Module,
    bfl_module,
    from_any,
    from_peft,
    fuse,
    kohya_targets,
    unfuse,
)

# FLUX.1-dev's published transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
LINEAR1 = "lora_unet_single_blocks_0_linear1"


def _randn(*shape: int, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _update(module: Module) -> Tensor:
    down, up, alpha = module
    return alpha / down.shape[0] * up @ down


def _with_lora(linear: nn.Linear, module: Module, x: Tensor) -> Tensor:
    down, up, alpha = module
    return linear(x) + alpha / down.shape[0] * (x @ down.T @ up.T)


def _linears(widths: list[int], in_dim: int, gen: torch.Generator) -> tuple[list[nn.Linear], nn.Linear]:
    """Random Linear layers of these widths, and the one Linear that is all of them stacked by rows."""
    parts = []
    for width in widths:
        layer = nn.Linear(in_dim, width, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(_randn(width, in_dim, gen=gen))
            layer.bias.copy_(_randn(width, gen=gen))
        parts.append(layer)
    fused = nn.Linear(in_dim, sum(widths), dtype=torch.float64)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return parts, fused


def _parts(name: str, widths: list[int], in_dim: int, ranks: list[int], alphas: list[float], seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{name}:{part}": (_randn(rank, in_dim, gen=gen), _randn(width, rank, gen=gen), alpha)
        for part, width, rank, alpha in zip(FUSED_PARTS[name.split("_", 5)[-1]], widths, ranks, alphas, strict=True)
    }


# --- a. the fold is exact ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "widths"),
    [(QKV, [8, 8, 8]), (LINEAR1, [8, 8, 8, 32])],  # linear1: q, k, v as wide as the input, then the MLP's 4x
)
def test_fused_lora_on_the_fused_layer_equals_the_parts_on_theirs(name, widths):
    gen = torch.Generator().manual_seed(0)
    layers, fused_layer = _linears(widths, 8, gen)
    parts = _parts(name, widths, 8, [2] * len(widths), [3.0] * len(widths), seed=1)
    ((fused_name, fused_module),) = fuse(parts).items()
    assert fused_name == name
    assert fused_module[0].shape == (2 * len(widths), 8)  # rank: the parts' ranks summed
    assert fused_module[2] / fused_module[0].shape[0] == 3.0 / 2  # the consumer's alpha / rank is the parts' scale
    x = _randn(5, 8, gen=gen)
    pairs = zip(layers, parts.values(), strict=True)
    separate = torch.cat([_with_lora(layer, module, x) for layer, module in pairs], dim=1)
    assert torch.allclose(_with_lora(fused_layer, fused_module, x), separate, rtol=1e-12, atol=1e-12)


def test_parts_of_different_ranks_and_scales_fold_and_unfold_exactly():
    parts = _parts(LINEAR1, [8, 8, 8, 32], 8, [2, 3, 1, 4], [1.0, 6.0, 0.5, 4.0], seed=2)
    fused = fuse(parts)
    assert fused[LINEAR1][0].shape == (10, 8)
    back = unfuse(fused)
    assert set(back) == set(parts)
    for name, module in parts.items():
        assert back[name][0].shape == module[0].shape  # each part's rank found again in the block-diagonal up
        assert torch.allclose(_update(back[name]), _update(module), rtol=1e-12, atol=1e-12)


def test_unfuse_of_fuse_gives_back_the_same_modules():
    passthrough = {"lora_unet_double_blocks_0_img_attn_proj": (torch.ones(2, 8), torch.ones(8, 2), 1.0)}
    modules = (
        _parts(QKV, [8, 8, 8], 8, [2, 2, 2], [1.0] * 3, seed=3)
        | _parts(LINEAR1, [8, 8, 8, 32], 8, [2] * 4, [4.0] * 4, seed=4)
        | passthrough
    )
    fused = fuse(modules)
    assert set(fused) == {QKV, LINEAR1, *passthrough}
    back = unfuse(fused)
    assert set(back) == set(modules)
    for name, (down, up, alpha) in modules.items():
        assert torch.equal(back[name][0], down)
        assert torch.equal(back[name][1], up)
        assert back[name][2] == alpha


def test_a_fused_layer_missing_a_part_is_refused():
    parts = _parts(LINEAR1, [8, 8, 8, 32], 8, [2] * 4, [1.0] * 4, seed=5)
    del parts[f"{LINEAR1}:mlp"]
    with pytest.raises(ValueError, match=r"linear1: part\(s\) \['mlp'\] missing"):
        fuse(parts)
    with pytest.raises(ValueError, match=r"part\(s\) \['v'\] missing"):
        kohya_targets(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])


# --- b. sd-scripts' files ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "out"), [(QKV, 24), (LINEAR1, 56)])
def test_sd_scripts_shared_down_unfuses_into_the_fused_update(name, out):
    """sd-scripts' default: one rank-r down for the whole layer and a dense up of all its rows."""
    gen = torch.Generator().manual_seed(6)
    fused = (_randn(4, 8, gen=gen), _randn(out, 4, gen=gen), 2.0)
    parts = unfuse({name: fused})
    assert list(parts) == [f"{name}:{p}" for p in FUSED_PARTS[name.split("_", 5)[-1]]]
    for down, _, alpha in parts.values():
        assert torch.equal(down, fused[0])
        assert alpha == 2.0
    joined = torch.cat([_update(m) for m in parts.values()])
    assert torch.allclose(joined, _update(fused), rtol=1e-12, atol=1e-12)


def test_sd_scripts_split_qkv_block_diagonal_keeps_the_loaders_scale():
    """`split_qkv=True` files: block-diagonal up, the part's alpha kept with the summed rank (issue #2204)."""
    gen = torch.Generator().manual_seed(7)
    ups = [_randn(8, 2, gen=gen) for _ in range(3)]
    fused = (_randn(6, 8, gen=gen), torch.block_diag(*ups), 2.0)
    parts = unfuse({QKV: fused})
    assert [m[0].shape[0] for m in parts.values()] == [2, 2, 2]
    assert all(m[2] / 2 == 2.0 / 6 for m in parts.values())  # what ComfyUI and diffusers apply: alpha / 6
    assert torch.allclose(torch.cat([_update(m) for m in parts.values()]), _update(fused), rtol=1e-12, atol=1e-12)


# --- the full-size FLUX.1-dev architecture ----------------------------------------------


@pytest.fixture(scope="module")
def flux_dev() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV)


@pytest.fixture(scope="module")
def dev_targets(flux_dev) -> list[tuple[str, str]]:
    return kohya_targets(n for n, m in flux_dev.named_modules() if isinstance(m, nn.Linear))


@pytest.fixture(scope="module")
def dev_lora(flux_dev, dev_targets) -> dict[str, Module]:
    """A rank-1 LoRA of every target, alpha 0.5 (scale a power of two, so the loaders' products are exact)."""
    gen = torch.Generator().manual_seed(8)
    layers = dict(flux_dev.named_modules())
    return {
        name: (_randn(1, layers[path].in_features, gen=gen), _randn(layers[path].out_features, 1, gen=gen), 0.5)
        for name, path in dev_targets
    }


def test_targets_are_every_linear_in_the_blocks_modulation_included(flux_dev, dev_targets):
    assert len(dev_targets) == 19 * 14 + 38 * 6
    fused_names = {name.partition(":")[0] for name, _ in dev_targets}
    assert len(fused_names) == 19 * 10 + 38 * 3  # BFL: 10 Linears per double block, 3 per single block
    assert {"lora_unet_double_blocks_18_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin"} <= fused_names
    assert "lora_unet_single_blocks_37_modulation_lin" in fused_names
    assert not any("blocks" not in path for _, path in dev_targets)  # embedders and the final layer: left out
    with pytest.raises(ValueError, match=r"lora_A\.default"):
        kohya_targets(["transformer_blocks.0.attn.to_q.lora_A.default"])


def test_diffusers_kohya_converter_reads_our_file_into_our_parts(dev_targets, dev_lora):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state: dict[str, Tensor] = {}
    for name, (down, up, alpha) in fuse(dev_lora).items():
        state |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha, dtype=torch.float64),
        }
    # Leftover lora_unet keys raise ("Incompatible keys detected"); other prefixes are dropped silently,
    # so every part must come out under its diffusers name, and nothing else.
    converted = _convert_kohya_flux_lora_to_diffusers(state)
    expected = {f"transformer.{path}.lora_{ab}.weight" for _, path in dev_targets for ab in "AB"}
    assert set(converted) == expected
    gen = torch.Generator().manual_seed(9)
    theirs, ours = [], []
    for name, path in dev_targets:
        down, up, alpha = dev_lora[name]
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        assert a.shape == down.shape and b.shape == up.shape, name  # read as block-diagonal: rank 1 again
        x = _randn(down.shape[1], 2, gen=gen)  # the updates compared on random inputs: cheap at full size
        theirs.append(b @ (a @ x))
        ours.append(alpha * up @ (down @ x))
    assert torch.allclose(torch.cat(theirs), torch.cat(ours), rtol=1e-12, atol=1e-12)
    for name, path in [
        ("lora_unet_double_blocks_7_img_attn_qkv:k", "transformer_blocks.7.attn.to_k"),
        ("lora_unet_single_blocks_21_linear1:v", "single_transformer_blocks.21.attn.to_v"),
    ]:
        lora_a, lora_b = (converted[f"transformer.{path}.lora_{ab}.weight"] for ab in "AB")
        assert torch.equal(lora_b @ lora_a, _update(dev_lora[name]))


def _bfl_extras(sd_shapes: dict[str, torch.Size], layers: int, single_layers: int) -> dict[str, str]:
    """BFL checkpoint keys the LoRA does not touch -> diffusers keys (the single-file converter's map)."""
    extras = {
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "txt_in": "context_embedder",
        "img_in": "x_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    keys = {f"{bfl}.{w}": f"{ours}.{w}" for bfl, ours in extras.items() for w in ("weight", "bias")}
    for i in range(layers):
        for bfl, ours in [("img_attn", ("norm_q", "norm_k")), ("txt_attn", ("norm_added_q", "norm_added_k"))]:
            keys[f"double_blocks.{i}.{bfl}.norm.query_norm.scale"] = f"transformer_blocks.{i}.attn.{ours[0]}.weight"
            keys[f"double_blocks.{i}.{bfl}.norm.key_norm.scale"] = f"transformer_blocks.{i}.attn.{ours[1]}.weight"
    for i in range(single_layers):
        keys[f"single_blocks.{i}.norm.query_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_q.weight"
        keys[f"single_blocks.{i}.norm.key_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_k.weight"
    assert set(keys.values()) <= set(sd_shapes)
    return keys


def test_our_bfl_names_are_flux_checkpoint_keys_and_comfyui_maps_every_kohya_name(flux_dev, dev_targets, dev_lora):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd_shapes = {k: v.shape for k, v in flux_dev.state_dict().items()}
    # A BFL checkpoint (meta tensors) of our fused layers, their rows the parts' rows in order.
    rows: dict[str, tuple[int, int]] = {}  # BFL module -> (rows so far, input size)
    for _, path in dev_targets:
        bfl_path, _ = bfl_module(path)
        out, in_dim = sd_shapes[f"{path}.weight"]
        rows[bfl_path] = (rows.get(bfl_path, (0, in_dim))[0] + out, in_dim)
    checkpoint = {}
    for bfl_path, (out, in_dim) in rows.items():
        checkpoint[f"{bfl_path}.weight"] = torch.empty(out, in_dim, device="meta")
        checkpoint[f"{bfl_path}.bias"] = torch.empty(out, device="meta")
    for bfl, ours in _bfl_extras(sd_shapes, FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]).items():
        checkpoint[bfl] = torch.empty(sd_shapes[ours], device="meta")
    bfl_shapes = {k: v.shape for k, v in checkpoint.items()}

    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # it pops every key it knows; a misnamed one would be left (or KeyError)
    assert {k: v.shape for k, v in converted.items()} == sd_shapes

    # ComfyUI, comfy/lora.py model_lora_keys_unet: every `diffusion_model.<path>.weight` of the model is
    # reachable as `lora_unet_<path with . as _>`; the LoRA's alpha is divided by lora_down's rows.
    key_map = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in bfl_shapes if k.endswith(".weight")
    }
    for name, (down, up, alpha) in fuse(dev_lora).items():
        assert name in key_map, name
        assert bfl_shapes[key_map[name]] == (up.shape[0], down.shape[1]), name
        assert alpha / down.shape[0] == 0.5, name


# --- e. diffusers / PEFT format ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_peft_reads_diffusers_format_into_our_targets(dev_targets, dev_lora, prefix):
    state: dict[str, Tensor] = {}
    for name, path in dev_targets:
        down, up, alpha = dev_lora[name]
        state[f"{prefix}{path}.lora_A.weight"], state[f"{prefix}{path}.lora_B.weight"] = down, up
        state[f"{prefix}{path}.alpha"] = torch.tensor(alpha)
    no_alpha = "single_transformer_blocks.3.proj_mlp"
    del state[f"{prefix}{no_alpha}.alpha"]
    state |= {
        f"{prefix}x_embedder.lora_A.weight": torch.zeros(1, 64),  # kohya's default FLUX LoRA has no img_in
        f"{prefix}x_embedder.lora_B.weight": torch.zeros(3072, 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 768),
    }
    given = {f"{prefix}transformer_blocks.2.ff.net.2": 7.0}

    read = from_peft(state, alpha=given)

    assert set(read.modules) == set(dev_lora)
    for name, (down, up, _) in dev_lora.items():
        assert read.modules[name][0] is down and read.modules[name][1] is up
    assert read.modules["lora_unet_single_blocks_3_linear1:mlp"][2] == 1.0  # no alpha: alpha = rank
    assert read.modules["lora_unet_double_blocks_2_img_mlp_2"][2] == 7.0  # given over the file's
    assert read.modules["lora_unet_double_blocks_0_img_attn_qkv:q"][2] == 0.5
    assert sorted(read.unmapped) == [f"{prefix}x_embedder.lora_A.weight", f"{prefix}x_embedder.lora_B.weight"]
    assert read.ignored == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]


def test_files_of_either_format_read_back_into_our_targets(dev_targets, dev_lora):
    """`read_lora` keeps a file's module names: kohya's fused ones, or diffusers' `transformer.<path>`."""
    kohya = unfuse(from_any(fuse(dev_lora)))
    peft = unfuse(from_any({f"transformer.{path}": dev_lora[name] for name, path in dev_targets}))
    other = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": dev_lora[QKV + ":q"]}
    assert unfuse(from_any(other)) == other  # not ours to map: passed on for the caller to report
    for read in (kohya, peft):
        assert set(read) == set(dev_lora)
        for name, (down, up, alpha) in dev_lora.items():
            assert torch.equal(read[name][0], down) and torch.equal(read[name][1], up) and read[name][2] == alpha
