"""The plain reference: a LoRA step written the way diffusers' example scripts write it.

A benchmark compares our `Trainer` with `BareLoop` (peft layers on kohya's
target modules, autocast, AdamW, DDPM noise, MSE) on the same weights and the
same latents, in the same process. FLUX.1's plain loop, and the choice
between the two, is `bench.bare_flux`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_core.config.lora_config import LoraConfig
from lora_core.dataset.buckets import apply_bucket, read_buckets
from lora_core.dataset.caption_text import read_caption
from lora_core.families.family import LoadedModel
from lora_core.foundation.layout import SubjectLayout

__all__ = ["BareInputs", "BareLoop", "autocast", "bare_inputs", "pictures"]

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BareInputs:
    """The subject's training inputs, made once the plain way: VAE latents, token ids, text states."""

    latents: torch.Tensor  # [n, 4, h, w] (FLUX: 16 channels, shifted), scaled, fp32, on the device
    input_ids: list[torch.Tensor]  # per tokenizer, [n, 77]
    hidden: torch.Tensor  # the text condition of frozen encoders, fp32 (FLUX: T5's states)
    pooled: torch.Tensor | None  # SDXL's pooled embedding (FLUX: CLIP-L's)
    time_ids: torch.Tensor | None  # SDXL's size conditioning, [n, 6]


def _encode(base: LoadedModel, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD1.5: the last layer; SDXL: both encoders' penultimate layers side by side and bigG's pooled output."""
    if base.family.name != "sdxl":
        return base.text_encoders[0](input_ids[0]).last_hidden_state, None
    first = base.text_encoders[0](input_ids[0], output_hidden_states=True).hidden_states[-2]
    second = base.text_encoders[1](input_ids[1], output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def pictures(layout: SubjectLayout) -> tuple[list[Any], torch.Tensor, list[str]]:
    """The subject's bucket assignments, its bucketed photos as pixels in [-1, 1] and their captions."""
    assignments = read_buckets(layout.buckets_csv)
    pixels, captions = [], []
    for assignment in assignments:
        image_path = layout.root / assignment.image
        with Image.open(image_path) as image:
            picture = apply_bucket(image.convert("RGB"), assignment)
        pixels.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(read_caption(image_path.with_suffix(".txt"))[0])
    return assignments, torch.stack(pixels), captions


@torch.no_grad()
def bare_inputs(base: LoadedModel, layout: SubjectLayout, device: str | torch.device) -> BareInputs:
    """Encode the subject's bucketed photos and captions with the base model in fp32 (before training casts it)."""
    device = torch.device(device)
    assignments, pixels, captions = pictures(layout)
    vae = base.vae.to(device, torch.float32)
    latents = vae.encode(pixels.to(device)).latent_dist.mean * vae.config.scaling_factor
    input_ids = [
        tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
        for tok in base.tokenizers
    ]
    for encoder in base.text_encoders:
        encoder.to(device, torch.float32)
    hidden, pooled = _encode(base, input_ids)
    time_ids = None
    if base.family.name == "sdxl":
        rows = [
            [a.original_height, a.original_width, a.crop_top, a.crop_left, a.bucket_height, a.bucket_width]
            for a in assignments
        ]
        time_ids = torch.tensor(rows, dtype=torch.float32, device=device)
    # Contiguous (NCHW) as our trainer's cache: the VAE's output on the CPU is channels-last, and a UNet fed
    # channels-last runs in that layout throughout, which is a different (on the CPU, faster) computation.
    latents = latents.float().contiguous()
    return BareInputs(latents, input_ids, hidden.float(), None if pooled is None else pooled.float(), time_ids)


def autocast(device: torch.device, precision: str) -> Any:
    return nullcontext() if precision == "no" else torch.autocast(device.type, dtype=DTYPES[precision])


class BareLoop:
    """The LoRA step the plain way, on a base model nothing else has touched.

    Frozen weights in the training dtype, peft LoRA (fp32) on kohya's target
    modules, `torch.autocast`, a `GradScaler` for fp16, gradient clipping at 1,
    AdamW (or bitsandbytes' AdamW8bit), DDPM noise and an MSE loss; the loss is
    read back every step, as any loop that logs it does.
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
        from diffusers import DDPMScheduler
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        self.base, self.inputs, self.precision = base, inputs, precision
        self.device = torch.device(device)
        self.batch_size, self.train_text = config.train_batch_size, config.train_text_encoder
        dtype = DTYPES[precision]
        names = ["text_encoder", "text_encoder_2"][: len(base.text_encoders)]
        trained = {"unet": base.unet} | (dict(zip(names, base.text_encoders, strict=True)) if self.train_text else {})
        targets = base.family.lora_targets(trained)
        groups: list[dict[str, Any]] = []
        for component, module in trained.items():
            module.to(self.device, dtype).requires_grad_(False)
            paths = [t.path for t in targets if t.component == component]
            lora = PeftLoraConfig(
                r=config.network_dim, lora_alpha=config.network_alpha, target_modules=paths, init_lora_weights=True
            )
            inject_adapter_in_model(lora, module)
            params = [p for name, p in module.named_parameters() if ".lora_" in name]
            for param in params:
                param.data = param.data.float()
                param.requires_grad_(True)
            lr = config.unet_lr if component == "unet" else config.text_encoder_lr
            if groups and component != "unet":
                groups[-1]["params"] += params  # one group for the text encoders, as our trainer makes
            else:
                groups.append({"params": params, "lr": lr})
        self.params = [p for group in groups for p in group["params"]]
        if config.gradient_checkpointing:  # the same work as ours: the sdxl preset checkpoints
            base.unet.enable_gradient_checkpointing()
            base.unet.train()  # diffusers checkpoints only in training mode
        args = dict(config.optimizer_args)
        if config.optimizer.value == "AdamW8bit" and self.device.type == "cuda":
            import bitsandbytes

            self.optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(groups, **args)
        else:
            self.optimizer = torch.optim.AdamW(groups, **args)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.schedule = DDPMScheduler.from_config(base.noise_scheduler.config)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.count = 0

    def step(self) -> float:
        """One optimizer step on the next batch; returns the loss."""
        n = self.inputs.latents.shape[0]
        index = torch.tensor([(self.count * self.batch_size + i) % n for i in range(self.batch_size)])
        self.count += 1
        index = index.to(self.device)
        latents = self.inputs.latents[index]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        steps = self.schedule.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(index),), generator=self.generator, device=self.device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        with autocast(self.device, self.precision):
            if self.train_text:
                hidden, pooled = _encode(self.base, [ids[index] for ids in self.inputs.input_ids])
            else:
                hidden = self.inputs.hidden[index]
                pooled = None if self.inputs.pooled is None else self.inputs.pooled[index]
            extra = {}
            if self.base.family.name == "sdxl":
                assert self.inputs.time_ids is not None
                extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.inputs.time_ids[index]}}
            prediction = self.base.unet(noisy, timesteps, hidden, **extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def train(self, steps: int) -> list[float]:
        for module in [self.base.unet, *self.base.text_encoders]:
            module.train()
        return [self.step() for _ in range(steps)]
