"""SDXL: two CLIP text encoders side by side, a pooled embedding and size conditioning, 1024 px.

kohya names the UNet's modules with Stability's paths (`input_blocks_4_1_...`),
as sd-scripts trains SDXL on that module tree, and the encoders `lora_te1` and
`lora_te2`; files naming the UNet the diffusers way load too. The `sdxl`
preset is the recipe's settings at 1024 px inside 10 GB, as sd-scripts' 12 GB
recipe does it: gradient checkpointing and the UNet only, so the text
encoders' outputs are cached once and the encoders leave the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_core.families.family import LoadedModel, LoraTarget, TextCondition
from lora_core.families.stable_diffusion import StableDiffusionFamily, join_windows, token_windows

if TYPE_CHECKING:
    import torch

    from lora_core.config.lora_config import LoraConfig
    from lora_core.dataset.train_data import TrainItem

__all__ = ["FAMILY", "SDXLConditioning", "StableDiffusionXL", "stability_path"]

_STABILITY_PATHS = [
    (re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"input_blocks.{3 * i + j + 1}.1."),
    (re.compile(r"^mid_block\.attentions\.0\."), lambda: "middle_block.1."),
    (re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"output_blocks.{3 * i + j}.1."),
]


def stability_path(path: str) -> str:
    """A diffusers SDXL UNet attention path in Stability's naming (sd-scripts' sdxl_model_util map)."""
    for pattern, replace in _STABILITY_PATHS:
        match = pattern.match(path)
        if match:
            return replace(*map(int, match.groups())) + path[match.end() :]
    raise ValueError(f"no Stability name for SDXL UNet module {path!r}")


class SDXLConditioning:
    """Both encoders' penultimate layers side by side, the second's pooled output, and size conditioning."""

    def __init__(self, model: LoadedModel, clip_skip: int, max_token_length: int) -> None:
        self.model, self.max_token_length = model, max_token_length
        # sd-scripts' SDXL trainer ignores clip_skip too: the penultimate layer is part of the architecture.
        self.clip_skip = clip_skip
        self.notes = (f"clip_skip {clip_skip} is not used for SDXL (always the penultimate layer)",) * (clip_skip > 1)

    def encode(self, captions: list[str], device: torch.device) -> TextCondition:
        import torch

        model = self.model
        states, pooled = [], None
        windows = (token_windows(tok, captions, self.max_token_length, device) for tok in model.tokenizers)
        for ids_first, ids_second in zip(*windows, strict=True):
            first = model.text_encoders[0](ids_first, output_hidden_states=True).hidden_states[-2]
            second = model.text_encoders[1](ids_second, output_hidden_states=True)
            states.append(torch.cat([first, second.hidden_states[-2]], dim=-1))
            pooled = second.text_embeds if pooled is None else pooled  # the first window's, as kohya does
        return TextCondition(join_windows(states), pooled)

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]:
        """Size conditioning per image: original size, crop top-left, target size (height first)."""
        import torch

        rows = [
            [a.original_height, a.original_width, a.crop_top, a.crop_left, a.bucket_height, a.bucket_width]
            for a in (item.assignment for item in items)
        ]
        time_ids = torch.tensor(rows, dtype=torch.float32, device=device)
        return {
            "encoder_hidden_states": text.hidden,
            "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids},
        }


class StableDiffusionXL(StableDiffusionFamily):
    name = "sdxl"
    label = "SDXL"
    builtin = "builtin:tiny-sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_prefixes: Mapping[str, str] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    presets: Mapping[str, Mapping[str, Any]] = {
        "sdxl": {
            "model_family": "sdxl",
            "resolution": 1024,
            "max_bucket_reso": 2048,
            "mixed_precision": "bf16",
            "save_precision": "bf16",
            "gradient_checkpointing": True,
            "train_text_encoder": False,
        }
    }

    def recognises_folder(self, model_index: Mapping[str, Any]) -> bool:
        # Two text encoders and a UNet (FLUX.1 has two encoders and a transformer).
        return "XL" in model_index.get("_class_name", "") or {"text_encoder_2", "unet"} <= model_index.keys()

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    def recognises_hub_id(self, repo_id: str) -> bool:
        return "xl" in repo_id.lower()

    def recognises_lora(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("sdxl")

    def unet_name(self, path: str) -> str:
        return super().unet_name(stability_path(path))

    def lora_aliases(self, target: LoraTarget) -> tuple[str, ...]:
        return (super().unet_name(target.path),) if target.component == "unet" else ()

    def conditioning(self, model: LoadedModel, config: LoraConfig) -> SDXLConditioning:
        return SDXLConditioning(model, config.clip_skip, config.max_token_length)

    def base_model_version(self, model: LoadedModel) -> str:
        return "sdxl_base_v1-0"

    def metadata(self, model: LoadedModel, config: LoraConfig) -> dict[str, Any]:
        return {
            "ss_v2": "False",
            "ss_clip_skip": None,  # SDXL ignores it
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }

    def pipeline(self, model: LoadedModel, scheduler: Any) -> Any:
        return self.pipeline_class()(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0],
            tokenizer_2=model.tokenizers[1],
            unet=model.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def decode(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """SDXL VAEs that normalise their latents (`latents_mean`/`latents_std`) are undone first."""
        vae = model.vae
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is None or std is None:
            return super().decode(model, latents, height, width)
        import torch

        latents = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return vae.decode(latents * std / vae.config.scaling_factor + mean, return_dict=False)[0]


FAMILY = StableDiffusionXL()
