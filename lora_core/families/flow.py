"""Rectified flow, the objective FLUX.1 learns: straight paths from the image to noise, and the velocity along them.

x_t = (1 - t) x + t noise and the target noise - x, as sd-scripts'
`flux_train_utils` trains it, with its ways of drawing t
(`timestep_sampling`) and of reading the model's output
(`model_prediction_type`). The latents travel as FLUX.1's transformer reads
them: 2x2 patches packed into a sequence, with each patch's position.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lora_core.config.lora_config import LoraConfig

__all__ = ["FlowObjective", "image_ids", "pack", "unpack"]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents as FLUX's sequence of 2x2 patches, [B, H/2 * W/2, 4C] (diffusers' `_pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(sequence: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents `height` x `width`."""
    b, _, channels = sequence.shape
    patches = sequence.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Each packed patch's (0, row, column): the transformer's rotary positions for the image."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class FlowObjective:
    """Rectified flow as sd-scripts trains FLUX.1: x_t = (1 - t) x + t noise, target noise - x, t drawn by
    `timestep_sampling` (sigma, uniform, sigmoid, shift, flux_shift); no min-SNR weighting."""

    def __init__(self, config: LoraConfig, schedule: Any) -> None:
        self.sampling, self.scale = config.timestep_sampling, config.sigmoid_scale
        self.shift, self.prediction = config.discrete_flow_shift, config.model_prediction_type
        self.schedule = schedule

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        if self.sampling == "sigma":  # a step of the model's own (shifted) schedule, uniformly
            sigmas = self.schedule.sigmas
            return sigmas[torch.randint(0, len(sigmas) - 1, (1,), generator=generator)].float()
        if self.sampling == "uniform":
            return torch.rand((1,), generator=generator)
        t = torch.sigmoid(self.scale * torch.randn((1,), generator=generator))
        if self.sampling == "shift":
            t = t * self.shift / (1 + (self.shift - 1) * t)
        elif self.sampling == "flux_shift":  # shifted by the image's size, as FLUX.1's own sampler shifts
            patches = (shape[-2] // 2) * (shape[-1] // 2)
            mu = 0.5 + (1.15 - 0.5) * (patches - 256) / (4096 - 256)
            t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        return t

    def at(self, step: int) -> torch.Tensor:
        import torch

        return torch.tensor([step / 1000])

    @staticmethod
    def _sigma(timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float().view(-1, 1, 1, 1)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(timesteps)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weigh(self, loss: torch.Tensor, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        return loss

    def output(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sd-scripts' `model_prediction_type`: the output as is (raw), plus the noisy input (additive), or
        scaled by -sigma plus the noisy input (sigma_scaled)."""
        if self.prediction == "additive":
            return prediction + noisy
        if self.prediction == "sigma_scaled":
            return prediction * -self._sigma(timesteps) + noisy
        return prediction
