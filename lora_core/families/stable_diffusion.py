"""What the Stable Diffusion families share: CLIP text encoders, a UNet trained on DDPM noise, a 4-channel VAE.

SD1.5 and SDXL (`sd15`, `sdxl`) are both built on this, as sd-scripts'
SDXL trainer overrides a few hooks of its SD trainer: captions in 77-token
windows, kohya's default LoRA targets (every `Linear` and 1x1 `Conv2d` inside
the UNet's transformers and the CLIP attention/MLP blocks), noise prediction
(or v-prediction) with min-SNR weighting, and the VAE's own latent scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_core.families.family import LoadedModel, LoraTarget, ModelFamily

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora_core.config.lora_config import LoraConfig

__all__ = [
    "NoiseObjective",
    "StableDiffusionFamily",
    "join_windows",
    "target_paths",
    "text_encoder_name",
    "token_windows",
]

UNET_BLOCKS = ("Transformer2DModel",)
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def token_windows(
    tokenizer: Any, captions: list[str], max_token_length: int, device: torch.device
) -> list[torch.Tensor]:
    """Captions as 77-token windows: BOS, up to 75 tokens, EOS, padding; one window per 75 tokens.

    `max_token_length` 150 or 225 (kohya's setting) gives 2 or 3 windows, each
    encoded alone, so long captions are not cut at 75.
    """
    import torch

    windows = max_token_length // 75
    bodies = [ids[: 75 * windows] for ids in tokenizer(captions, add_special_tokens=False, verbose=False).input_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = []
    for window in range(windows):
        rows = []
        for body in bodies:
            piece = body[75 * window : 75 * (window + 1)]
            rows.append([tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (75 - len(piece)))
        chunks.append(torch.tensor(rows, device=device))
    return chunks


def join_windows(states: list[torch.Tensor]) -> torch.Tensor:
    """The windows' hidden states as one sequence, as sd-scripts joins them: 77, 152 or 227 positions.

    The first window's BOS, each window's 75 inner positions, the last window's
    final position; the inner BOS/EOS pairs are dropped.
    """
    import torch

    if len(states) == 1:
        return states[0]
    return torch.cat([states[0][:, :1], *(s[:, 1:76] for s in states), states[-1][:, -1:]], dim=1)


def _is_target_layer(module: nn.Module) -> bool:
    from torch import nn

    # Exact classes, as sd-scripts matches class names: a peft wrapper is not a target again.
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.kernel_size == (1, 1)


def target_paths(root: nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """The paths of kohya's target layers inside every module of a class named in `blocks`."""
    paths: list[str] = []
    for name, module in root.named_modules():
        if type(module).__name__ in blocks:
            for child, layer in module.named_modules():
                if child and _is_target_layer(layer):
                    paths.append(f"{name}.{child}")
    return list(dict.fromkeys(paths))


def text_encoder_name(prefix: str, path: str) -> str:
    """kohya's name of a CLIP module: paths start `text_model_` (transformers 5 dropped that level from
    `CLIPTextModel`; every loader still expects it)."""
    if not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_{path.replace('.', '_')}"


class NoiseObjective:
    """DDPM: latents noised by the model's own schedule; the UNet predicts the noise (or v), min-SNR weighted."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule
        self.num_timesteps = int(schedule.config.num_train_timesteps)
        self.v_prediction = schedule.config.prediction_type == "v_prediction"

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.randint(0, self.num_timesteps, (1,), generator=generator)

    def at(self, step: int) -> torch.Tensor:
        import torch

        return torch.tensor([step])

    def output(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return prediction

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.schedule.get_velocity(latents, noise, timesteps) if self.v_prediction else noise

    def weigh(self, loss: torch.Tensor, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        """Min-SNR weighting, https://arxiv.org/abs/2303.09556 (eq. 4; v-prediction divides by snr + 1)."""
        if not min_snr_gamma:
            return loss
        alphas = self.schedule.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        return loss * snr.clamp(max=min_snr_gamma) / (snr + 1 if self.v_prediction else snr)


class StableDiffusionFamily(ModelFamily):
    """The parts SD1.5 and SDXL share; each names its UNet modules, prefixes and pipeline itself."""

    pipeline_class_name: str  # diffusers' pipeline of this family
    text_prefixes: Mapping[str, str]  # component -> kohya's prefix

    def unet_name(self, path: str) -> str:
        return "lora_unet_" + path.replace(".", "_")

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_options(self) -> dict[str, Any]:
        return {}

    def load(self, source: str, loader: str, options: dict[str, Any], parts: Mapping[str, str]) -> LoadedModel:
        from diffusers import DDPMScheduler

        pipeline = getattr(self.pipeline_class(), loader)(source, **self.load_options(), **options)
        encoders = [name for name in ("text_encoder", "text_encoder_2") if name in self.text_prefixes]
        return LoadedModel(
            spec=source,
            family=self,
            unet=pipeline.unet,
            vae=pipeline.vae,
            text_encoders=[getattr(pipeline, name) for name in encoders],
            tokenizers=[getattr(pipeline, name.replace("text_encoder", "tokenizer")) for name in encoders],
            noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        )

    def objective(self, model: LoadedModel, config: LoraConfig) -> NoiseObjective:
        if config.v_parameterization:
            model.noise_scheduler.register_to_config(prediction_type="v_prediction")
        return NoiseObjective(model.noise_scheduler)

    def predict(
        self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        return model.unet(noisy, timesteps, **kwargs).sample

    def lora_targets(self, components: Mapping[str, nn.Module]) -> list[LoraTarget]:
        targets: list[LoraTarget] = []
        for component, root in components.items():
            if component == "unet":
                targets += [LoraTarget(self.unet_name(p), component, p) for p in target_paths(root, UNET_BLOCKS)]
            else:
                prefix = self.text_prefixes[component]
                paths = target_paths(root, TEXT_BLOCKS)
                targets += [LoraTarget(text_encoder_name(prefix, p), component, p) for p in paths]
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError("two modules share a kohya name")
        return targets

    def decode(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = model.vae
        latents = latents.to(vae.device, vae.dtype)
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
