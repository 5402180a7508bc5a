"""What a model family is: everything that differs between SD1.5, SDXL and the next, behind one interface.

A family (`ModelFamily`) recognises its models (a diffusers folder, a hub id,
a single-file checkpoint's keys, a LoRA's metadata), loads them, conditions
the denoiser, states the training objective, names the LoRA's modules as kohya
does, writes its part of the metadata, renders, and brings its presets (its
memory recipe). `lora_core.families.FAMILIES` is the registry; no code outside
`families/` asks which family a model is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # torch loads when a model does: the command line checks its flags without it
    import torch

    from lora_core.config.lora_config import LoraConfig
    from lora_core.dataset.train_data import TrainItem

__all__ = [
    "Conditioning",
    "LoadedModel",
    "LoraModule",
    "LoraTarget",
    "ModelFamily",
    "Objective",
    "TextCondition",
]


LoraModule = tuple["torch.Tensor", "torch.Tensor", float]  # (down, up, alpha) of one module


@dataclass(frozen=True)
class LoraTarget:
    """One trained module: kohya's name for it, and where it is in our model."""

    name: str  # kohya's, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    component: str  # "unet", "text_encoder", "text_encoder_2"
    path: str  # module path inside that component, as named_modules() gives it


@dataclass
class TextCondition:
    """Encoded captions: the hidden states the denoiser attends to, and a pooled embedding where it has one."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        import torch

        pooled = [p.pooled for p in parts if p.pooled is not None]
        return TextCondition(torch.cat([p.hidden for p in parts]), torch.cat(pooled) if pooled else None)


@dataclass
class LoadedModel:
    """A base model's parts as training needs them, loaded once per process, and the family that knows them."""

    spec: str
    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any

    @property
    def components(self) -> dict[str, Any]:
        """The trainable parts by the names kohya's prefixes use."""
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet} | dict(zip(names, self.text_encoders, strict=True))

    def place(self, device: Any, dtype: Any) -> None:
        """The frozen weights on `device` in `dtype`; the VAE in fp32 there (fp16 VAEs overflow to NaN)."""
        import torch

        for component in self.components.values():
            component.to(device, dtype=dtype)
        self.vae.to(device, dtype=torch.float32)

    @property
    def version(self) -> str:
        """sd-scripts' `ss_base_model_version`."""
        return self.family.base_model_version(self)


class Conditioning(Protocol):
    """How captions (and anything else) condition the denoiser: encode once, then the call's keyword arguments."""

    notes: tuple[str, ...]
    clip_skip: int

    def encode(self, captions: list[str], device: torch.device) -> TextCondition: ...

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]: ...


class Objective(Protocol):
    """What the denoiser learns: how timesteps are drawn, how latents are noised at one, what it predicts,
    how each loss weighs. A timestep is whatever the denoiser takes: DDPM's step index, a flow's sigma."""

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """One image's timestep, shape (1,), drawn from `generator` alone (the run stays reproducible)."""

    def at(self, step: int) -> torch.Tensor:
        """The timestep `step` of 1000 as this objective writes it, shape (1,): the fixed loss's points."""

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def weigh(self, loss: torch.Tensor, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        """Each image's loss weighted by its timestep (min-SNR, where the objective has it)."""

    def output(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output as the objective compares it with `target` (sd-scripts'
        `model_prediction_type`; the output itself for most)."""


class ModelFamily(ABC):
    """One model family. Subclasses fill in what differs; the registry holds one instance of each."""

    name: ClassVar[str]  # the registry key and the config's `model_family`
    label: ClassVar[str]  # how messages name it: "SD1.x/2.x", "SDXL"
    # Preset name -> LoraConfig values over the defaults: the family's recipe and the memory it relies on.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    builtin: ClassVar[str | None] = None  # its tiny offline model (`lora_core.foundation.tiny_models`), if any

    # -- recognising a model --

    @abstractmethod
    def recognises_folder(self, model_index: Mapping[str, Any]) -> bool:
        """A diffusers folder (its `model_index.json`) holds this family's model."""

    @abstractmethod
    def recognises_checkpoint(self, keys: set[str]) -> bool:
        """A single-file checkpoint (its tensor names) holds this family's model."""

    def recognises_hub_id(self, repo_id: str) -> bool:
        """A hub id names this family's model, as far as its name tells (never loaded to find out)."""
        return False

    def recognises_lora(self, metadata: Mapping[str, str]) -> bool:
        """A LoRA file (its `ss_*` metadata) was trained on this family."""
        return False

    # -- loading --

    @abstractmethod
    def load(self, source: str, loader: str, options: dict[str, Any], parts: Mapping[str, str]) -> LoadedModel:
        """The model at `source` through diffusers' `loader` ("from_pretrained" or "from_single_file");
        `parts`: components the user keeps as files of their own (FLUX.1's `clip_l`, `t5xxl`, `ae`)."""

    def check_config(self, config: LoraConfig, model: LoadedModel) -> None:  # noqa: B027 (optional hook)
        """Raise when a setting cannot describe this model (the message says how to fix it)."""

    # -- training --

    @abstractmethod
    def conditioning(self, model: LoadedModel, config: LoraConfig) -> Conditioning: ...

    @abstractmethod
    def objective(self, model: LoadedModel, config: LoraConfig) -> Objective: ...

    @abstractmethod
    def predict(
        self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The denoiser's output for `noisy` latents [B, C, H, W], in their shape (`kwargs`: the
        conditioning's `unet_kwargs`)."""

    def prepare_denoiser(
        self, model: LoadedModel, config: LoraConfig, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """Store the frozen denoiser as the config's memory recipe asks (fp8, 4-bit), before the LoRA is added.

        True: it is in the training `dtype` but for the weights it stores its own way (quantised on
        `device`, layer by layer), which must not be cast again.
        """
        return False

    def oom_step(self, config: LoraConfig) -> tuple[dict[str, Any], str] | None:
        """This family's own next step down after running out of memory, before the shared ladder's."""
        return None

    @abstractmethod
    def lora_targets(self, components: Mapping[str, torch.nn.Module]) -> list[LoraTarget]:
        """Every module the LoRA trains in `components`, under kohya's names."""

    def lora_aliases(self, target: LoraTarget) -> tuple[str, ...]:
        """Other names a LoRA file may give `target` (read, never written)."""
        return ()

    def to_file(self, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
        """The trained modules `{target name: (down, up, alpha)}` as the file names them (kohya's layout)."""
        return modules

    def from_file(self, modules: Mapping[str, LoraModule]) -> dict[str, LoraModule]:
        """A file's modules under our target names (the inverse of `to_file`; other formats too)."""
        return dict(modules)

    # -- the file users load --

    @abstractmethod
    def base_model_version(self, model: LoadedModel) -> str:
        """sd-scripts' `ss_base_model_version`."""

    @abstractmethod
    def metadata(self, model: LoadedModel, config: LoraConfig) -> dict[str, Any]:
        """This family's `ss_*` and `modelspec.*` keys (`ss_v2`, `ss_clip_skip`, the architecture)."""

    # -- rendering --

    @abstractmethod
    def pipeline(self, model: LoadedModel, scheduler: Any) -> Any:
        """A diffusers pipeline over the model's modules (shared, never copied)."""

    def render_scheduler(self, model: LoadedModel) -> Any | None:
        """The scheduler every render uses whatever `sample_sampler` says (None: the sampler's)."""
        return None

    def sample_defaults(self, model: LoadedModel) -> tuple[int, float]:
        """(steps, guidance scale) of a sample prompt that sets neither (`--s`, `--l`)."""
        return 20, 7.0

    def render_kwargs(self, model: LoadedModel, negative: str) -> dict[str, Any]:
        """The pipeline call's family-specific arguments (a negative prompt where the family uses one)."""
        return {"negative_prompt": negative}

    @abstractmethod
    def decode(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A pipeline's `output_type="latent"` latents of a `height` x `width` image to pixels in [-1, 1],
        in the VAE's own weight dtype."""

    def __str__(self) -> str:
        return self.label


def read_checkpoint_keys(path: Path) -> set[str] | None:
    """The tensor names of a `.safetensors` checkpoint, from its header alone (None: not one we can read so)."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(Path(path), framework="pt") as handle:
        return set(handle.keys())
