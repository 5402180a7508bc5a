"""kohya's default LoRA network as peft layers on a base model.

The network trains exactly the modules sd-scripts' default LoRA trains (see
`lora_core.families`), with peft's `lora_A`/`lora_B` initialised as kohya initialises
`lora_down`/`lora_up` (Kaiming-uniform and zeros), so the file we write is the
file kohya would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_core.families.family import LoadedModel, LoraTarget
from lora_core.foundation.lora_file import LoraFile

__all__ = ["LoadReport", "LoraNetwork"]


@dataclass(frozen=True)
class LoadReport:
    """How an existing LoRA file matched the network it was loaded into."""

    loaded: int
    missing: list[str]  # our modules the file has no weights for (they start fresh)
    unexpected: list[str]  # the file's modules we do not train (ignored)


class LoraNetwork:
    """kohya's default LoRA on `base`: peft layers in the UNet and, if asked, the text encoder(s)."""

    def __init__(self, base: LoadedModel, rank: int, alpha: float, train_text_encoder: bool = True) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.rank, self.alpha, self.family = int(rank), float(alpha), base.family
        self.components = base.components if train_text_encoder else {"unet": base.unet}
        self.targets: list[LoraTarget] = base.family.lora_targets(self.components)
        # Everything the base model has is frozen, the text encoders too when they get no LoRA:
        # otherwise their weights' gradients are computed (and their memory held) every step.
        for module in [*base.components.values(), base.vae]:
            module.requires_grad_(False)
        before = torch.random.get_rng_state()
        injected = []
        for component, root in self.components.items():
            paths = [t.path for t in self.targets if t.component == component]
            if not paths:  # a component the family trains no LoRA in (FLUX.1's T5)
                continue
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=paths, init_lora_weights=True)
            inject_adapter_in_model(config, root)
            injected.append(root)
            root.requires_grad_(False)
            for target in (t for t in self.targets if t.component == component):
                for param in self._pair(target):
                    param.requires_grad_(True)
        if any(p.dtype != torch.float32 for p in self.parameters()):
            self._initialise_in_fp32(injected, before)

    @staticmethod
    def _initialise_in_fp32(roots: list[torch.nn.Module], rng: torch.Tensor) -> None:
        """peft gives a LoRA the dtype of the layer it wraps, so over fp8-stored weights its initial values are
        rounded to fp8. Made again in fp32 from the same random state, in peft's order: the values a
        full-precision base gets."""
        from peft.tuners.lora.layer import LoraLayer

        torch.random.set_rng_state(rng)
        for root in roots:
            for module in root.modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    module.lora_A["default"].float()
                    module.lora_B["default"].float()
                    module.reset_lora_parameters("default", init_lora_weights=True)

    def _layer(self, target: LoraTarget) -> Any:
        return self.components[target.component].get_submodule(target.path)

    def _pair(self, target: LoraTarget) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """(down, up): peft's lora_A and lora_B weights of one module."""
        layer = self._layer(target)
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def parameters(self, component: str | None = None) -> list[torch.nn.Parameter]:
        """The trainable tensors, of one component or all."""
        return [p for t in self.targets if component in (None, t.component) for p in self._pair(t)]

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{kohya name: (lora_down, lora_up)}`, ready for `lora_io.save_lora`."""
        return {t.name: tuple(p.detach() for p in self._pair(t)) for t in self.targets}  # type: ignore[misc]

    def clear(self) -> None:
        """A zero update everywhere: the network computes the base model, as when fresh."""
        with torch.no_grad():
            for target in self.targets:
                self._pair(target)[1].zero_()

    def load(self, lora: LoraFile, strength: float = 1.0) -> LoadReport:
        """Start from an existing kohya-format LoRA (ours or kohya's): the recipe's way to resume.

        A file with another alpha/rank ratio is rescaled into `up`, so the
        network computes the same update the file describes, times `strength`
        (the `<lora:name:0.8>` weight of AUTOMATIC1111; 0 gives the base model).
        Modules the file lacks get a zero update, as a fresh network has.
        """
        ours = {t.name: t for t in self.targets}
        # Also the names a family reads but does not write (SDXL's UNet named the diffusers way).
        ours |= {alias: t for t in self.targets for alias in self.family.lora_aliases(t)}
        loaded, unexpected = set(), []
        with torch.no_grad():
            for name, (down, up, alpha) in self.family.from_file(lora.modules).items():
                target = ours.get(name)
                if target is None:
                    unexpected.append(name)
                    continue
                ours_down, ours_up = self._pair(target)
                if down.shape != ours_down.shape or up.shape != ours_up.shape:
                    raise ValueError(
                        f"{name}: the file's rank-{down.shape[0]} weights {tuple(down.shape)}/{tuple(up.shape)} do "
                        f"not fit this network's {tuple(ours_down.shape)}/{tuple(ours_up.shape)}; "
                        f"set network_dim to {down.shape[0]}"
                    )
                ratio = (alpha / down.shape[0]) / (self.alpha / self.rank)
                ours_down.copy_(down.to(ours_down))
                ours_up.copy_((up.float() * ratio * strength).to(ours_up))
                loaded.add(target.name)
            missing = [t.name for t in self.targets if t.name not in loaded]
            for name in missing:
                self._pair(ours[name])[1].zero_()
        return LoadReport(len(loaded), missing, sorted(unexpected))
