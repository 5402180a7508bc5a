"""FLUX.1 LoRA names: diffusers' module tree, where we train, to kohya's file, which everything else loads.

We train with peft on diffusers' `FluxTransformer2DModel`, whose attention has
separate `to_q`/`to_k`/`to_v` layers; sd-scripts, ComfyUI, Forge and diffusers'
own kohya loader know FLUX LoRAs by Black Forest Labs' module names, where q,
k and v are one `qkv` Linear and a single-stream block's q, k, v and MLP input
are one `linear1` ([q; k; v; mlp] by rows). So each trained module has a
*target name*: kohya's name (`lora_unet_` + the BFL path with dots as
underscores), plus `:q`/`:k`/`:v`/`:mlp` for one part of a fused layer.
`fuse` turns those parts into the file's fused modules and `unfuse` takes
them apart again, both exactly; `from_peft` reads diffusers/PEFT-format files
(ai-toolkit, diffusers' training scripts) into the same target names.

Modules are `(down [rank, in], up [out, rank], alpha)`, the update
`alpha / rank * up @ down`, as in `lora_core.foundation.lora_file`. The map
diffusers -> BFL is the one diffusers' single-file loader applies
(`convert_flux_transformer_checkpoint_to_diffusers`); the tests check it
against that converter and against diffusers' kohya FLUX LoRA converter.
That converter knows FLUX.1's sizes only (19 + 38 blocks, single-block
linear1 split as 3 x 3072 + 12288), so diffusers loads these files for
FLUX.1-sized models alone; ComfyUI maps names without sizes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with a model: the command line lists the presets without it
    from torch import Tensor

__all__ = [
    "FUSED_PARTS",
    "Module",
    "PeftModules",
    "bfl_module",
    "from_any",
    "from_peft",
    "fuse",
    "kohya_name",
    "kohya_targets",
    "unfuse",
]

Module = tuple["Tensor", "Tensor", float]  # (down [rank, in], up [out, rank], alpha)

PREFIX = "lora_unet_"  # sd-scripts' LORA_PREFIX_FLUX, "make ComfyUI compatible"

# diffusers path inside a block -> (BFL path inside the block, part of a fused layer or None).
_DOUBLE: dict[str, tuple[str, str | None]] = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_SINGLE: dict[str, tuple[str, str | None]] = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_BLOCKS = {"transformer_blocks": ("double_blocks", _DOUBLE), "single_transformer_blocks": ("single_blocks", _SINGLE)}
_BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

# The fused BFL layers (by kohya's name suffix) and their parts, in row order.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("q", "k", "v"),
    "txt_attn_qkv": ("q", "k", "v"),
    "linear1": ("q", "k", "v", "mlp"),
}
_FUSED_NAME = re.compile(r"^lora_unet_(?:double|single)_blocks_\d+_(img_attn_qkv|txt_attn_qkv|linear1)$")


# --- Names ----------------------------------------------------------------------------


def bfl_module(path: str) -> tuple[str, str | None] | None:
    """A diffusers transformer Linear's BFL module path and its part of a fused layer.

    None for a layer outside the double/single-stream blocks (embedders, final
    layer), which sd-scripts' default FLUX LoRA does not train. A path inside a
    block that FLUX.1 has no Linear at raises: the model is not FLUX.1, or
    peft's own layers (`lora_A.default`, `base_layer`) were passed.
    """
    match = _BLOCK_PATH.match(path)
    if match is None:
        return None
    kind, index, rest = match.groups()
    bfl_block, table = _BLOCKS[kind]
    if rest not in table:
        raise ValueError(f"{path!r}: no FLUX.1 Linear of that name in a {kind} block (pass the model's own Linears)")
    bfl_rest, part = table[rest]
    return f"{bfl_block}.{index}.{bfl_rest}", part


def kohya_name(bfl_path: str) -> str:
    """sd-scripts' name for a BFL module: `lora_unet_` and the path with dots as underscores."""
    return PREFIX + bfl_path.replace(".", "_")


def _target_name(path: str) -> str | None:
    found = bfl_module(path)
    if found is None:
        return None
    bfl_path, part = found
    return kohya_name(bfl_path) + (f":{part}" if part else "")


def kohya_targets(transformer_module_paths: Iterable[str]) -> list[tuple[str, str]]:
    """`(target name, diffusers path)` for the Linears sd-scripts' default FLUX LoRA trains.

    That is every Linear inside the double- and single-stream blocks, the
    modulation layers (`img_mod.lin`, `txt_mod.lin`, `modulation.lin`)
    included: `networks/lora_flux.py` replaces every child `Linear` of a
    `DoubleStreamBlock`/`SingleStreamBlock` with `dim = default_dim if
    default_dim is not None else self.lora_dim`, and only the optional
    `img_mod_dim`/`txt_mod_dim`/`single_mod_dim` network args (0 skips) change
    that. Layers outside the blocks are left out, as sd-scripts leaves them
    unless `in_dims` is given. A fused layer must have all its parts here, or
    the file could not be written after training.
    """
    targets = [(name, path) for path in transformer_module_paths if (name := _target_name(path)) is not None]
    names = [name for name, _ in targets]
    if len(set(names)) != len(names):
        raise ValueError("two module paths map to one kohya FLUX name")
    _check_parts(names)
    return targets


def _split_target(name: str) -> tuple[str, str | None]:
    base, _, part = name.partition(":")
    return base, part or None


def _fused_parts(name: str) -> tuple[str, ...] | None:
    """The parts of the fused layer a kohya name names, in row order; None for any other name."""
    match = _FUSED_NAME.match(name)
    return FUSED_PARTS[match.group(1)] if match else None


def _ranges(sizes: Iterable[int]) -> list[tuple[int, int]]:
    return list(pairwise(accumulate(sizes, initial=0)))


def _check_parts(names: Iterable[str]) -> None:
    """Raise unless every fused layer named has exactly its parts."""
    parts: dict[str, set[str]] = {}
    for name in names:
        base, part = _split_target(name)
        if part is not None:
            parts.setdefault(base, set()).add(part)
    for base, have in parts.items():
        want = _fused_parts(base)
        if want is None:
            raise ValueError(f"{base!r} is not a fused FLUX layer, so it has no parts ({sorted(have)})")
        if missing := [p for p in want if p not in have]:
            raise ValueError(f"{base}: part(s) {missing} missing; a fused layer needs all of {list(want)}")
        if extra := sorted(have - set(want)):
            raise ValueError(f"{base}: unknown part(s) {extra}; it has {list(want)}")


# --- Fusing and unfusing --------------------------------------------------------------


def _fuse_parts(parts: list[Module]) -> Module:
    """One LoRA for a fused layer whose row blocks are the parts' updates, exactly.

    down is the parts' downs stacked (rank R = sum of the parts' ranks) and up
    their ups block-diagonally, so row block j of up @ down is up_j @ down_j.
    When all parts share one scale s = alpha/rank (as one peft config gives
    them), alpha = s * R keeps the tensors bit-for-bit and every consumer's
    alpha / R equal to s. (sd-scripts' own `split_qkv` merge keeps the part's
    alpha with rank R, weakening the layer 3-4x, sd-scripts issue #2204.)
    Parts of different scales get their scale multiplied into their up block
    and alpha = R (scale 1): exact up to one rounding per element.
    """
    downs = [down for down, _, _ in parts]
    if len({down.shape[1:] for down in downs}) != 1:
        raise ValueError(f"the parts' downs disagree on the input size: {[tuple(d.shape) for d in downs]}")
    ranks = [down.shape[0] for down in downs]
    total = sum(ranks)
    alpha0, rank0 = parts[0][2], ranks[0]
    if all(alpha * rank0 == alpha0 * rank for (_, _, alpha), rank in zip(parts, ranks, strict=True)):
        ups, alpha = [up for _, up, _ in parts], alpha0 * total / rank0
    else:
        ups, alpha = [up * (a / r) for (_, up, a), r in zip(parts, ranks, strict=True)], float(total)
    import torch

    return torch.cat(downs), torch.block_diag(*ups), alpha


def fuse(modules: Mapping[str, Module]) -> dict[str, Module]:
    """Our per-part modules as the file's: each fused layer's parts folded into one LoRA (`_fuse_parts`).

    Modules that are not parts pass through. Raises ValueError when a fused
    layer lacks a part, as a kohya file cannot hold part of a layer's LoRA.
    Give a layer's parts one rank: diffusers' converter recognises the
    block-diagonal up only in equal rank blocks, and otherwise hands every
    part the whole rank-R down (still exact, but rank R in every part).
    """
    _check_parts(modules)
    out: dict[str, Module] = {}
    grouped: dict[str, dict[str, Module]] = {}
    for name, module in modules.items():
        base, part = _split_target(name)
        if part is None:
            out[name] = module
        else:
            grouped.setdefault(base, {})[part] = module
    for base, parts in grouped.items():
        if base in out:
            raise ValueError(f"{base} is given both whole and in parts")
        out[base] = _fuse_parts([parts[p] for p in _fused_parts(base) or ()])
    return out


def _row_sizes(name: str, parts: int, out: int, in_dim: int) -> list[int]:
    """A fused layer's rows per part, from its shape: q, k and v each as wide as the input (FLUX's hidden size)."""
    if parts == 4:
        if out <= 3 * in_dim:
            raise ValueError(f"{name}: up has {out} rows, not 3 x {in_dim} (q, k, v) plus the MLP's")
        return [in_dim] * 3 + [out - 3 * in_dim]
    if out != 3 * in_dim:
        raise ValueError(f"{name}: up has {out} rows, not 3 x {in_dim} (q, k, v)")
    return [in_dim] * 3


def _rank_blocks(up: Tensor, rows: list[int]) -> list[tuple[int, int]] | None:
    """The rank columns each row block of `up` uses, when up is block-diagonal; None when it is dense.

    Equal blocks first, as sd-scripts writes them and diffusers' converter
    looks for them (a zero up is read so, too); then any ordered, disjoint
    column ranges, for parts of different ranks.
    """
    total, n = up.shape[1], len(rows)
    used = [up[a:b].ne(0).any(dim=0) for a, b in _ranges(rows)]
    if total % n == 0:
        width = total // n
        equal = [(j * width, (j + 1) * width) for j in range(n)]
        if all(not mask[:a].any() and not mask[b:].any() for mask, (a, b) in zip(used, equal, strict=True)):
            return equal
    cols = [mask.nonzero().flatten().tolist() for mask in used]
    if not all(cols) or any(cols[j][-1] >= cols[j + 1][0] for j in range(n - 1)):
        return None
    return list(pairwise([0, *(c[0] for c in cols[1:]), total]))


def unfuse(modules: Mapping[str, Module]) -> dict[str, Module]:
    """File modules -> our per-part target names, each part reproducing its row block of the fused update.

    A block-diagonal up (ours, or sd-scripts' `split_qkv`) splits into its
    parts' ranks, each part keeping the fused scale (alpha_j = alpha * r_j / R);
    a dense up (sd-scripts' default: one shared rank-r down) gives every part
    that down, its rows of up and the same alpha. Modules that are not fused
    layers pass through.
    """
    out: dict[str, Module] = {}
    for name, (down, up, alpha) in modules.items():
        parts = _fused_parts(name)
        if parts is None:
            out[name] = (down, up, alpha)
            continue
        rows = _row_sizes(name, len(parts), up.shape[0], down.shape[1])
        blocks = _rank_blocks(up, rows)
        total = down.shape[0]
        for j, (part, (a, b)) in enumerate(zip(parts, _ranges(rows), strict=True)):
            if blocks is None:
                out[f"{name}:{part}"] = (down, up[a:b], alpha)
            else:
                c, d = blocks[j]
                out[f"{name}:{part}"] = (down[c:d], up[a:b, c:d], alpha * (d - c) / total)
    return out


# --- diffusers / PEFT format ------------------------------------------------------------


@dataclass
class PeftModules:
    """A diffusers/PEFT-format LoRA read into our target names, and what was left out and why."""

    modules: dict[str, Module]
    unmapped: list[str] = field(default_factory=list)  # transformer keys kohya's FLUX format cannot hold
    ignored: list[str] = field(default_factory=list)  # text-encoder keys: we train the transformer only


_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")  # optional adapter name, e.g. .default
_PEFT_PREFIXES = ("transformer.", "base_model.model.")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.")


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def from_peft(state: Mapping[str, Tensor], alpha: Mapping[str, float] | None = None) -> PeftModules:
    """A diffusers/PEFT LoRA state dict (`[transformer.]<path>.lora_A.weight`, `.lora_B.weight`, `.alpha`).

    alpha per module: `alpha[path]` (path with or without `transformer.`, as
    read from the file's `lora_adapter_metadata`, say) over a `<path>.alpha`
    tensor over the rank. Rank is the convention of this format: diffusers'
    `get_peft_kwargs` takes `lora_alpha` = r when a file has no alphas, its
    `train_dreambooth_lora_flux.py` trains with `lora_alpha=args.rank`, and
    ai-toolkit bakes alpha/rank into the weights for PEFT ("peft doesnt have
    an alpha", its `scripts/convert_lora_to_peft_format.py`). Text-encoder keys
    are ignored; keys of layers kohya's FLUX format does not hold (embedders,
    final layer, DoRA magnitudes, lora_B biases) are listed in `unmapped`.
    """
    given = {_strip_prefix(k): float(v) for k, v in (alpha or {}).items()}
    pairs: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, float] = {}
    keys: dict[str, list[str]] = {}
    result = PeftModules({})
    for key, tensor in state.items():
        if key.startswith(_TEXT_PREFIXES):
            result.ignored.append(key)
            continue
        bare = _strip_prefix(key)
        match = _PEFT_KEY.match(bare)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
            keys.setdefault(match.group(1), []).append(key)
        elif bare.endswith(".alpha"):
            alphas[bare.removesuffix(".alpha")] = float(tensor.float().item())
            keys.setdefault(bare.removesuffix(".alpha"), []).append(key)
        else:
            result.unmapped.append(key)
    for path, pair in pairs.items():
        try:
            name = _target_name(path)
        except ValueError:
            name = None
        if name is None or set(pair) != {"lora_A", "lora_B"}:
            result.unmapped.extend(keys[path])
            continue
        down, up = pair["lora_A"], pair["lora_B"]
        result.modules[name] = (down, up, given.get(path, alphas.get(path, float(down.shape[0]))))
    result.unmapped.extend(k for path in sorted(alphas.keys() - pairs.keys()) for k in keys[path])
    return result


def from_any(modules: Mapping[str, Module]) -> dict[str, Module]:
    """A LoRA file's modules, kohya-named or diffusers/PEFT-named (`[transformer.]<path>`), in kohya's names.

    diffusers paths of the blocks' Linears become our target names (parts of a
    fused layer as `name:part`); every other name passes through, for `unfuse`
    (kohya's fused layers) or for the caller to report. Modules as
    `lora_file.read_lora` returns them, whose alpha is already the file's or
    the rank, the diffusers/PEFT convention (`from_peft`).
    """
    out: dict[str, Module] = {}
    for name, module in modules.items():
        try:
            target = _target_name(_strip_prefix(name))
        except ValueError:
            target = None
        out[target or name] = module
    return out
