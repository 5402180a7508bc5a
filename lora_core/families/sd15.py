"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a 4-channel UNet, 512 px (768 for 2.x v-models).

kohya's names are the diffusers module paths (`lora_unet_down_blocks_0_...`,
`lora_te_text_model_...`); the `sd15` preset is the recipe's SD1.5 settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_core.families.family import LoadedModel, TextCondition
from lora_core.families.stable_diffusion import StableDiffusionFamily, join_windows, token_windows

if TYPE_CHECKING:
    import torch

    from lora_core.config.lora_config import LoraConfig
    from lora_core.dataset.train_data import TrainItem

__all__ = ["FAMILY", "SD15Conditioning", "StableDiffusion1"]


class SD15Conditioning:
    """One CLIP text encoder, its last layer (or the n-th last with `clip_skip`)."""

    notes: tuple[str, ...] = ()

    def __init__(self, model: LoadedModel, clip_skip: int, max_token_length: int) -> None:
        self.model, self.clip_skip, self.max_token_length = model, clip_skip, max_token_length

    def encode(self, captions: list[str], device: torch.device) -> TextCondition:
        encoder = self.model.text_encoders[0]
        states = []
        for ids in token_windows(self.model.tokenizers[0], captions, self.max_token_length, device):
            out = encoder(ids, output_hidden_states=True)
            if self.clip_skip > 1:
                hidden = out.hidden_states[-self.clip_skip]
                states.append(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
            else:
                states.append(out.last_hidden_state)
        return TextCondition(join_windows(states))

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]:
        return {"encoder_hidden_states": text.hidden}


class StableDiffusion1(StableDiffusionFamily):
    name = "sd15"
    label = "SD1.x/2.x"
    builtin = "builtin:tiny-sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    text_prefixes: Mapping[str, str] = {"text_encoder": "lora_te"}
    presets: Mapping[str, Mapping[str, Any]] = {"sd15": {"model_family": "sd15"}}  # the recipe's own defaults

    def recognises_folder(self, model_index: Mapping[str, Any]) -> bool:
        return "unet" in model_index and "text_encoder_2" not in model_index

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith("cond_stage_model.") for k in keys) and any(
            k.startswith("model.diffusion_model.") for k in keys
        )

    def recognises_hub_id(self, repo_id: str) -> bool:
        return "xl" not in repo_id.lower()

    def recognises_lora(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("sd_v")

    def load_options(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def conditioning(self, model: LoadedModel, config: LoraConfig) -> SD15Conditioning:
        return SD15Conditioning(model, config.clip_skip, config.max_token_length)

    def base_model_version(self, model: LoadedModel) -> str:
        v_pred = model.noise_scheduler.config.prediction_type == "v_prediction"
        return f"sd_v{2 if self._is_2x(model) else 1}{'_v' if v_pred else ''}"

    @staticmethod
    def _is_2x(model: LoadedModel) -> bool:
        return getattr(model.text_encoders[0].config, "hidden_size", 768) == 1024

    def metadata(self, model: LoadedModel, config: LoraConfig) -> dict[str, Any]:
        return {
            "ss_v2": str(self._is_2x(model)),
            "ss_clip_skip": config.clip_skip,
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers",
        }

    def pipeline(self, model: LoadedModel, scheduler: Any) -> Any:
        return self.pipeline_class()(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            tokenizer=model.tokenizers[0],
            unet=model.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


FAMILY = StableDiffusion1()
