"""Renders use the training precision for the UNet and text encoders, never fp16 for the VAE (issue 12).

SDXL's VAE overflows in fp16 to black or NaN pictures. The CPU runs the same
fp16/bf16 autocast as a GPU, so spying on the autocast state each model runs
under proves which precision a CUDA card would use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lora_core.config.lora_config import LoraConfig
from lora_core.evaluation.metric_grids import GridRenderer
from lora_core.families.family import LoadedModel
from lora_core.families.loading import load_base_model
from lora_core.foundation.lora_file import LoraFile
from lora_core.training.precision import Precision
from lora_core.training.sampling import SamplePrompt, SampleSpec, render

TINY_SDXL = "builtin:tiny-sdxl"
CPU = torch.device("cpu")
SPEC = SampleSpec((SamplePrompt("t0k3n, portrait photo", width=64, height=64, steps=2, seeds=(1,)),))


@dataclass(frozen=True)
class Call:
    """The autocast state a model ran under, and the dtypes it saw."""

    autocast: bool
    autocast_dtype: torch.dtype
    input_dtype: torch.dtype | None = None
    weight_dtype: torch.dtype | None = None
    finite: bool = True

    @property
    def in_fp16(self) -> bool:
        return torch.float16 in (self.input_dtype, self.weight_dtype) or (
            self.autocast and self.autocast_dtype == torch.float16
        )


def _state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")


@contextmanager
def spying(base: LoadedModel) -> Iterator[dict[str, list[Call]]]:
    """Record every UNet and text encoder forward, and every VAE decode, while rendering."""
    calls: dict[str, list[Call]] = {"unet": [], "text": [], "decode": []}
    hooks = [base.unet.register_forward_pre_hook(lambda module, args: calls["unet"].append(Call(*_state())))]
    hooks += [
        encoder.register_forward_pre_hook(lambda module, args: calls["text"].append(Call(*_state())))
        for encoder in base.text_encoders
    ]
    real = base.vae.decode

    def decode(latents, *args, **kwargs):
        out = real(latents, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        weight = next(base.vae.parameters()).dtype
        calls["decode"].append(Call(*_state(), latents.dtype, weight, bool(torch.isfinite(sample).all())))
        return out

    base.vae.decode = decode
    try:
        yield calls
    finally:
        del base.vae.decode
        for hook in hooks:
            hook.remove()


def as_trainer(base: LoadedModel, precision: Precision) -> LoadedModel:
    """The frozen UNet and text encoders in the training dtype, the VAE in fp32, as the trainer keeps them."""
    for component in base.components.values():
        component.to(precision.device, dtype=precision.dtype)
    base.vae.to(precision.device, dtype=torch.float32)
    return base


@pytest.fixture(scope="module")
def sdxl(builtin_models_home) -> LoadedModel:
    return load_base_model(TINY_SDXL)


def assert_rendered_in(calls: dict[str, list[Call]], dtype: torch.dtype) -> None:
    assert calls["unet"] and all(c.autocast and c.autocast_dtype == dtype for c in calls["unet"])
    assert calls["text"] and all(c.autocast and c.autocast_dtype == dtype for c in calls["text"])
    assert calls["decode"], "the VAE decoded"
    assert not any(c.in_fp16 for c in calls["decode"]), calls["decode"]
    assert all(c.weight_dtype == torch.float32 and c.finite for c in calls["decode"]), calls["decode"]


def test_sdxl_renders_in_fp16_but_never_decodes_in_fp16(sdxl):
    precision = Precision(CPU, "fp16")
    with spying(as_trainer(sdxl, precision)) as calls:
        grid = render(sdxl, SPEC, precision)
    assert_rendered_in(calls, torch.float16)
    assert all(not c.autocast for c in calls["decode"]), "fp16 training: the VAE decodes in fp32, autocast off"
    assert grid[0][0].size == (64, 64)
    assert render(sdxl, SPEC, precision)[0][0].tobytes() == grid[0][0].tobytes(), "same inputs, same picture"


def test_sdxl_renders_in_bf16_and_may_decode_in_bf16(sdxl):
    precision = Precision(CPU, "bf16")
    with spying(as_trainer(sdxl, precision)) as calls:
        render(sdxl, SPEC, precision)
    assert_rendered_in(calls, torch.bfloat16)
    assert all(c.autocast and c.autocast_dtype == torch.bfloat16 for c in calls["decode"])


def test_the_grid_renderer_without_a_layout_renders_in_the_configs_precision(builtin_models_home):
    base = load_base_model(TINY_SDXL)
    target = next(
        t
        for t in base.family.lora_targets(base.components)
        if type(layer := base.components[t.component].get_submodule(t.path)) is nn.Linear
    )
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(4, layer.in_features, generator=generator) * 0.1
    up = torch.randn(layer.out_features, 4, generator=generator) * 0.1
    lora = LoraFile({target.name: (down, up, 4.0)}, {})

    renderer = GridRenderer(base, LoraConfig(mixed_precision="fp16"), lora, None, "cpu")
    assert renderer.precision == Precision(CPU, "fp16")
    frozen = [p for component in base.components.values() for p in component.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in base.vae.parameters())
    assert all(p.dtype == torch.float32 for p in renderer.network.parameters()), "the LoRA update stays fp32"
    with spying(base) as calls:
        renderer.grid(SPEC, lora)
    assert_rendered_in(calls, torch.float16)
