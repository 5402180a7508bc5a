"""The plain reference for FLUX.1: its LoRA step as diffusers' `train_dreambooth_lora_flux.py` writes it.

`plain_inputs` and `plain_loop` give a bench the plain loop a base model
calls for: `BareFluxLoop` when its family's objective is a rectified flow,
else `bench.bare_loop.BareLoop`. The bench asks the family for its
objective, never for its name.
"""

from __future__ import annotations

import itertools

import torch

from bench.bare_loop import DTYPES, BareInputs, BareLoop, autocast, bare_inputs, pictures
from lora_core.config.lora_config import LoraConfig
from lora_core.families.family import LoadedModel
from lora_core.foundation.layout import SubjectLayout

__all__ = ["BareFluxLoop", "flux_inputs", "flux_sample_decodes", "learns_flow", "plain_inputs", "plain_loop"]


def learns_flow(base: LoadedModel, config: LoraConfig) -> bool:
    """The family's objective is a rectified flow (FLUX.1): the plain loop is then diffusers' FLUX script's."""
    from lora_core.families.flow import FlowObjective

    return isinstance(base.family.objective(base, config), FlowObjective)


def plain_inputs(
    base: LoadedModel, layout: SubjectLayout, device: str | torch.device, config: LoraConfig
) -> BareInputs:
    """The plain loop's inputs for `base`: `flux_inputs` for a flow model, else `bare_inputs`."""
    return flux_inputs(base, layout, device, config) if learns_flow(base, config) else bare_inputs(base, layout, device)


def plain_loop(
    base: LoadedModel, inputs: BareInputs, config: LoraConfig, *, precision: str, device: str | torch.device
) -> BareLoop | BareFluxLoop:
    """The plain loop for `base`: `BareFluxLoop` for a flow model, else `BareLoop`."""
    kind = BareFluxLoop if learns_flow(base, config) else BareLoop
    return kind(base, inputs, config, precision=precision, device=device)


@torch.no_grad()
def flux_inputs(base: LoadedModel, layout: SubjectLayout, device: str | torch.device, config: LoraConfig) -> BareInputs:
    """FLUX's inputs the plain way, in fp32: the VAE's latents shifted and scaled, and `FluxPipeline.encode_prompt`'s
    T5 states (`t5xxl_max_token_length`, else diffusers' 512) and CLIP-L pooled output."""
    from diffusers import FluxPipeline

    device = torch.device(device)
    _, pixels, captions = pictures(layout)
    vae = base.vae.to(device, torch.float32)
    latents = (vae.encode(pixels.to(device)).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    for encoder in base.text_encoders:
        encoder.to(device, torch.float32)
    (clip, t5), (clip_tokenizer, t5_tokenizer) = base.text_encoders, base.tokenizers
    pipeline = FluxPipeline(base.noise_scheduler, vae, clip, clip_tokenizer, t5, t5_tokenizer, base.unet)
    hidden, pooled, _ = pipeline.encode_prompt(
        captions, None, device=device, max_sequence_length=config.t5xxl_max_token_length or 512
    )
    ids = [torch.zeros(0, dtype=torch.long)]  # the plain FLUX loop never trains a text encoder
    return BareInputs(latents.float().contiguous(), ids, hidden.float(), pooled.float(), None)


def _store(transformer: torch.nn.Module, config: LoraConfig, dtype: torch.dtype) -> None:
    """The frozen transformer as the preset stores it, with the libraries' own calls: diffusers' layerwise
    casting (float8 at rest, computed in `dtype`) for `fp8_base`; bitsandbytes' NF4 `Linear4bit` for every
    Linear of the blocks for `nf4_base` (the layers ours quantises: the same work). On the host, before it
    moves to the device (NF4 is quantised as it moves)."""
    import bitsandbytes as bnb
    from torch import nn

    transformer.to(dtype=dtype)
    if config.fp8_base:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if not config.nf4_base:
        return
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    layer = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, child.bias is not None, dtype, quant_type="nf4"
                    )
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, layer)


class BareFluxLoop:
    """FLUX.1's LoRA step as diffusers' `train_dreambooth_lora_flux.py` writes it, on a model nothing else touched.

    The frozen transformer in the training dtype (or stored as the preset says:
    `_store`), peft LoRA (fp32) on the family's target modules, autocast;
    sigmas drawn logit-normal (`compute_density_for_timestep_sampling`) and
    shifted by `discrete_flow_shift` (the presets' `shift` sampling), noisy =
    (1 - sigma) x + sigma noise, packed by `FluxPipeline._pack_latents` with
    `_prepare_latent_image_ids`; the prediction unpacked and compared with
    noise - x by MSE; clipping at 1, AdamW (AdamW8bit on a GPU); the loss read
    back every step.
    """

    def __init__(
        self,
        base: LoadedModel,
        inputs: BareInputs,
        config: LoraConfig,
        *,
        precision: str,
        device: str | torch.device,
    ) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        self.base, self.inputs, self.precision = base, inputs, precision
        self.device = torch.device(device)
        self.batch_size, self.guidance = config.train_batch_size, config.guidance_scale
        self.shift, self.logit_std = config.discrete_flow_shift, config.sigmoid_scale
        self.transformer = transformer = base.unet
        transformer.requires_grad_(False)
        _store(transformer, config, DTYPES[precision])
        transformer.to(self.device)
        paths = [t.path for t in base.family.lora_targets({"unet": transformer})]
        lora = PeftLoraConfig(
            r=config.network_dim, lora_alpha=config.network_alpha, target_modules=paths, init_lora_weights=True
        )
        inject_adapter_in_model(lora, transformer)
        self.params = [p for name, p in transformer.named_parameters() if ".lora_" in name]
        for param in self.params:
            param.data = param.data.float()
            param.requires_grad_(True)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        groups = [{"params": self.params, "lr": config.unet_lr}]
        if config.optimizer.value == "AdamW8bit" and self.device.type == "cuda":
            import bitsandbytes

            self.optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(groups, **config.optimizer_args)
        else:
            self.optimizer = torch.optim.AdamW(groups, **config.optimizer_args)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.vae_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
        self.text_ids = torch.zeros(inputs.hidden.shape[1], 3, device=self.device)
        self.count = 0

    def step(self) -> float:
        """One optimizer step on the next batch; returns the loss."""
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling

        n = self.inputs.latents.shape[0]
        index = torch.tensor([(self.count * self.batch_size + i) % n for i in range(self.batch_size)])
        self.count += 1
        index = index.to(self.device)
        x = self.inputs.latents[index]
        b, c, h, w = x.shape
        noise = torch.randn(x.shape, generator=self.generator, device=self.device)
        u = compute_density_for_timestep_sampling(
            "logit_normal", b, logit_mean=0.0, logit_std=self.logit_std, device=self.device, generator=self.generator
        )
        sigmas = self.shift * u / (1 + (self.shift - 1) * u)
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * x + sigma * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, x.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([self.guidance], device=self.device).expand(b)
        with autocast(self.device, self.precision):
            prediction = self.transformer(
                hidden_states=packed,
                timestep=sigmas,
                guidance=guidance,
                pooled_projections=self.inputs.pooled[index],
                encoder_hidden_states=self.inputs.hidden[index],
                txt_ids=self.text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        prediction = FluxPipeline._unpack_latents(prediction, h * self.vae_scale, w * self.vae_scale, self.vae_scale)
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - x).float())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def train(self, steps: int) -> list[float]:
        self.transformer.train()  # diffusers checkpoints only in training mode
        return [self.step() for _ in range(steps)]


@torch.no_grad()
def flux_sample_decodes(
    base: LoadedModel, inputs: BareInputs, precision: str, device: str | torch.device, steps: int = 4
) -> bool:
    """Euler steps along the flow (sigma 1 to 0) with the trained transformer in the training precision, the
    latents unscaled, unshifted and decoded by the VAE in fp32: True when every pixel is finite."""
    from diffusers import FluxPipeline

    device, transformer, vae = torch.device(device), base.unet, base.vae
    _, c, h, w = inputs.latents.shape
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn((1, c, h, w), generator=torch.Generator(device).manual_seed(0), device=device)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
    text_ids = torch.zeros(inputs.hidden.shape[1], 3, device=device)
    guidance = torch.full((1,), 3.5, device=device) if transformer.config.guidance_embeds else None
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
    was_training = transformer.training
    transformer.eval()
    with autocast(device, precision):
        for sigma, after in itertools.pairwise(sigmas):
            velocity = transformer(
                hidden_states=FluxPipeline._pack_latents(latents, 1, c, h, w),
                timestep=sigma.expand(1),
                guidance=guidance,
                pooled_projections=inputs.pooled[:1],
                encoder_hidden_states=inputs.hidden[:1],
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            latents = latents + (after - sigma) * FluxPipeline._unpack_latents(velocity, h * scale, w * scale, scale)
    transformer.train(was_training)
    home = next(vae.parameters()).device
    vae.to(device, torch.float32)
    with torch.autocast(device.type, enabled=False):
        image = vae.decode(latents.float() / vae.config.scaling_factor + vae.config.shift_factor).sample
    vae.to(home)
    return bool(torch.isfinite(image).all())
