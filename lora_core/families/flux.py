"""FLUX.1 (dev and schnell): a rectified-flow transformer, CLIP-L's pooled output and T5-XXL's hidden states.

What sets it apart from the Stable Diffusion families, as sd-scripts'
`flux_train_network.py` trains it: latents of 16 channels packed 2x2 into a
sequence with position ids; a flow objective (the transformer predicts
noise - latents at a sigma drawn by `timestep_sampling`); FLUX.1-dev's
guidance embedding fed `guidance_scale` while training; the text encoders'
outputs cached and both encoders off the GPU while the transformer trains.

The LoRA is trained on diffusers' module tree (separate q/k/v) and written as
sd-scripts' `networks/lora_flux.py` writes it (BFL names, fused qkv):
`flux_keys` folds and unfolds exactly. The memory recipe stores the frozen
transformer in fp8 (`fp8_base`, diffusers' layerwise casting: float8 at rest,
computed in the training precision) or 4-bit NF4 (`nf4_base`, bitsandbytes,
as diffusers' FLUX QLoRA recipe does); the LoRA keeps full-size shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_core.families import flux_keys
from lora_core.families.family import LoadedModel, LoraModule, LoraTarget, ModelFamily, TextCondition
from lora_core.families.flow import FlowObjective, image_ids, pack, unpack
from lora_core.families.stable_diffusion import TEXT_BLOCKS, target_paths, text_encoder_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora_core.config.lora_config import LoraConfig
    from lora_core.dataset.train_data import TrainItem

__all__ = ["FAMILY", "Flux", "FluxConditioning", "is_dev"]

# sd-scripts' defaults: T5 reads 512 tokens for dev, 256 for schnell (its training length).
T5_TOKENS = {True: 512, False: 256}
# diffusers' FluxPipeline defaults per variant: (steps, guidance).
SAMPLE_DEFAULTS = {True: (28, 3.5), False: (4, 0.0)}


def is_dev(model: LoadedModel) -> bool:
    """FLUX.1-dev has a guidance embedding; schnell (distilled to 4 steps) has none."""
    return bool(model.unet.config.guidance_embeds)


class FluxConditioning:
    """CLIP-L's pooled output and T5's hidden states (`t5xxl_max_token_length` tokens, padding masked out
    with `apply_t5_attn_mask`), and the guidance the transformer is told."""

    def __init__(self, model: LoadedModel, config: LoraConfig) -> None:
        self.model = model
        self.clip_skip = config.clip_skip
        self.t5_tokens = config.t5xxl_max_token_length or T5_TOKENS[is_dev(model)]
        self.mask = config.apply_t5_attn_mask
        self.guidance = config.guidance_scale
        notes = []
        if config.clip_skip > 1:
            notes.append(f"clip_skip {config.clip_skip} is not used for FLUX.1 (CLIP-L's pooled output only)")
        if config.min_snr_gamma:
            notes.append("min_snr_gamma is not used for FLUX.1 (a flow objective, not DDPM's noise schedule)")
        self.notes = tuple(notes)

    def encode(self, captions: list[str], device: torch.device) -> TextCondition:
        clip_tokenizer, t5_tokenizer = self.model.tokenizers
        clip, t5 = self.model.text_encoders
        ids = clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = clip(ids.input_ids.to(device), output_hidden_states=False).pooler_output
        tokens = t5_tokenizer(
            captions, padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device)
        hidden = t5(tokens.input_ids.to(device), attention_mask=mask if self.mask else None)[0]
        if self.mask:  # padding contributes nothing, as sd-scripts' masked T5 does
            hidden = hidden * mask[..., None].to(hidden.dtype)
        return TextCondition(hidden, pooled)

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]:
        import torch

        batch = text.hidden.shape[0]
        guidance = torch.full((batch,), self.guidance, device=device) if is_dev(self.model) else None
        return {
            "encoder_hidden_states": text.hidden,
            "pooled_projections": text.pooled,
            "txt_ids": torch.zeros(text.hidden.shape[1], 3, device=device),
            "guidance": guidance,
        }


# What every FLUX.1 preset shares: bf16, checkpointing, the transformer only, no min-SNR (a flow objective).
_RECIPE: dict[str, Any] = {
    "model_family": "flux",
    "resolution": 1024,
    "max_bucket_reso": 1536,
    "network_dim": 16,
    "network_alpha": 16,
    "unet_lr": 1e-4,
    "mixed_precision": "bf16",
    "save_precision": "bf16",
    "gradient_checkpointing": True,
    "train_text_encoder": False,
    "min_snr_gamma": 0,
}


class Flux(ModelFamily):
    name = "flux"
    label = "FLUX.1"
    builtin = "builtin:tiny-flux"
    # The memory each promises is in docs/flux.md; the out-of-memory ladder steps down through them.
    presets: Mapping[str, Mapping[str, Any]] = {
        "flux": _RECIPE | {"fp8_base": True},  # a 24 GB card: fp8 base weights (sd-scripts' fp8_base)
        "flux-16gb": _RECIPE | {"nf4_base": True},  # a 16 GB card: 4-bit NF4 base weights
        # A 12 GB card: NF4, and T5 reads 256 tokens (BLIP's captions are far shorter).
        "flux-12gb": _RECIPE | {"nf4_base": True, "t5xxl_max_token_length": 256, "max_bucket_reso": 1280},
    }

    # -- recognising a model --

    def recognises_folder(self, model_index: Mapping[str, Any]) -> bool:
        return "Flux" in model_index.get("_class_name", "")

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        """BFL's own names (`double_blocks.0.img_attn.qkv.weight`), bare or under ComfyUI's prefix."""
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def recognises_hub_id(self, repo_id: str) -> bool:
        return "flux" in repo_id.lower()

    def recognises_lora(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("flux1")

    # -- loading --

    def load(self, source: str, loader: str, options: dict[str, Any], parts: Mapping[str, str]) -> LoadedModel:
        """A diffusers folder or hub id; or BFL's transformer file (`flux1-dev.safetensors`) with the rest from
        `--base-model-config` (a FLUX.1 diffusers folder, or the hub's cache); `parts` (`clip_l`, `t5xxl`,
        `ae`) replace those components with the user's own files."""
        import torch

        from lora_core.families import flux_files

        options = dict(options)
        folder = options.pop("config", None)
        # bf16, as the weights are published: 12B parameters in fp32 would take 48 GB of host memory, and
        # FLUX.1 trains in bf16 (or fp16) anyway.
        options.setdefault("dtype", torch.bfloat16)
        pipeline = flux_files.load_pipeline(source, loader, folder, parts, options)
        return LoadedModel(
            spec=source,
            family=self,
            unet=pipeline.transformer,
            vae=pipeline.vae,
            text_encoders=[pipeline.text_encoder, pipeline.text_encoder_2],
            tokenizers=[pipeline.tokenizer, pipeline.tokenizer_2],
            noise_scheduler=pipeline.scheduler,
        )

    def check_config(self, config: LoraConfig, model: LoadedModel) -> None:
        from lora_core.config.lora_config import ConfigError

        if config.v_parameterization:
            raise ConfigError("v_parameterization is for SD2.x v-models; FLUX.1 learns a flow: set it to false")

    # -- training --

    def conditioning(self, model: LoadedModel, config: LoraConfig) -> FluxConditioning:
        return FluxConditioning(model, config)

    def objective(self, model: LoadedModel, config: LoraConfig) -> FlowObjective:
        return FlowObjective(config, model.noise_scheduler)

    def predict(
        self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on the packed latents at sigma `timesteps` (it scales them by 1000 itself)."""
        height, width = noisy.shape[-2:]
        out = model.unet(
            hidden_states=pack(noisy),
            timestep=timesteps,
            img_ids=image_ids(height, width, noisy.device),
            return_dict=False,
            **kwargs,
        )[0]
        return unpack(out, height, width)

    def prepare_denoiser(
        self, model: LoadedModel, config: LoraConfig, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """fp8 (`fp8_base`) or NF4 (`nf4_base`) storage for the transformer's linear layers; the rest in `dtype`
        (diffusers' recipe: cast, then store)."""
        import torch

        if not (config.nf4_base or config.fp8_base):
            return False
        model.unet.to(dtype=dtype)
        if config.nf4_base:
            _quantize_nf4(model.unet, dtype, device)
        else:
            model.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        return True

    def oom_step(self, config: LoraConfig) -> tuple[dict[str, Any], str] | None:
        """fp8 -> NF4 (the `flux-16gb` preset's base), then T5 at 256 tokens (`flux-12gb`'s)."""
        if not config.nf4_base:
            return {"nf4_base": True, "fp8_base": False}, "4-bit NF4 base weights"
        if (config.t5xxl_max_token_length or 512) > 256:
            return {"t5xxl_max_token_length": 256}, "T5 reads 256 tokens"
        return None

    def lora_targets(self, components: Mapping[str, nn.Module]) -> list[LoraTarget]:
        """sd-scripts' default FLUX.1 LoRA on the transformer; CLIP-L's as `lora_te1` when the text encoder
        trains (T5 never, as sd-scripts' default)."""
        from torch import nn

        targets: list[LoraTarget] = []
        for component, root in components.items():
            if component == "unet":
                linear = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
                targets += [LoraTarget(name, component, path) for name, path in flux_keys.kohya_targets(linear)]
            elif component == "text_encoder":
                paths = target_paths(root, TEXT_BLOCKS)
                targets += [LoraTarget(text_encoder_name("lora_te1", p), component, p) for p in paths]
        return targets

    def to_file(self, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
        return flux_keys.fuse(modules)

    def from_file(self, modules: Mapping[str, LoraModule]) -> dict[str, LoraModule]:
        """kohya's FLUX.1 names (ours, sd-scripts', fused or not), or the diffusers/PEFT format's paths
        (`transformer.transformer_blocks.0.attn.to_q`: diffusers' examples, ai-toolkit)."""
        return flux_keys.unfuse(flux_keys.from_any(modules))

    # -- the file users load --

    def base_model_version(self, model: LoadedModel) -> str:
        return "flux1"

    def metadata(self, model: LoadedModel, config: LoraConfig) -> dict[str, Any]:
        variant = "dev" if is_dev(model) else "schnell"
        return {
            "ss_v2": "False",
            "ss_clip_skip": None,
            "ss_timestep_sampling": config.timestep_sampling,
            "ss_sigmoid_scale": config.sigmoid_scale,
            "ss_discrete_flow_shift": config.discrete_flow_shift,
            "ss_model_prediction_type": config.model_prediction_type,
            "ss_guidance_scale": config.guidance_scale,
            "ss_apply_t5_attn_mask": config.apply_t5_attn_mask,
            "ss_t5xxl_max_token_length": config.t5xxl_max_token_length or T5_TOKENS[is_dev(model)],
            "modelspec.architecture": f"flux-1-{variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }

    # -- rendering --

    def pipeline(self, model: LoadedModel, scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        clip_tokenizer, t5_tokenizer = model.tokenizers
        clip, t5 = model.text_encoders
        return FluxPipeline(
            scheduler=scheduler,
            vae=model.vae,
            text_encoder=clip,
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=model.unet,
        )

    def render_scheduler(self, model: LoadedModel) -> Any:
        """FLUX.1 samples with its own flow-matching Euler schedule; kohya's samplers are for DDPM models."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config)

    def sample_defaults(self, model: LoadedModel) -> tuple[int, float]:
        return SAMPLE_DEFAULTS[is_dev(model)]

    def render_kwargs(self, model: LoadedModel, negative: str) -> dict[str, Any]:
        """No negative prompt (FLUX.1's guidance is distilled: a negative costs a second pass for little)."""
        return {"max_sequence_length": T5_TOKENS[is_dev(model)]}

    def decode(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """FluxPipeline's packed latents of a `height` x `width` image, unpacked, unscaled and unshifted."""
        vae = model.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = unpack(latents, height // scale, width // scale).to(vae.device, vae.dtype)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]


def _quantize_nf4(transformer: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Every linear layer of the transformer's blocks as bitsandbytes' 4-bit NF4, quantised on `device` one
    layer at a time (as diffusers' FLUX QLoRA recipe loads it); the embedders and the output layer stay."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    blocks = [m for n, m in transformer.named_children() if n in ("transformer_blocks", "single_transformer_blocks")]
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    quant_storage=torch.uint8,
                )
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer.to(device))  # quantised as it moves


FAMILY = Flux()
