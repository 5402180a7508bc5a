"""What the training benches share: models built from configs, a subject folder, and the plain reference loop.

Every model here is built from a config written out in this file, with seeded
random weights, so nothing is ever downloaded: speed and memory depend on the
shapes, not on the weights. A benchmark compares our `Trainer` with
`BareLoop`, the same LoRA step written the way diffusers' example scripts
write it (peft layers on kohya's target modules, autocast, AdamW, DDPM noise,
MSE), on the same weights and the same latents, in the same process.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benches build every model from a config; never fetch one

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_core.blip import BlipCaptioner
from lora_core.buckets import BucketPlan, apply_bucket, bucket_subject, read_buckets
from lora_core.caption_text import read_caption
from lora_core.captioning import caption_subject
from lora_core.config import LoraConfig
from lora_core.ingest import ingest
from lora_core.layout import SubjectLayout
from lora_core.lora_io import kohya_targets
from lora_core.models import BaseModel
from lora_core.settings import IngestSettings
from lora_core.tiny_models import sd_noise_scheduler

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BareInputs",
    "BareLoop",
    "StepClock",
    "all_finite",
    "bare_inputs",
    "build_base",
    "epoch_boundary",
    "fingerprint",
    "make_subject",
    "photo",
    "precision_name",
    "sample_decodes",
]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --- Architectures, written out (diffusers' and transformers' config keys) ----------------

# stable-diffusion-v1-5/unet/config.json
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stable-diffusion-xl-base-1.0/unet/config.json
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size numbers x 256 + bigG's 1280-wide pooled output
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "upcast_attention": False,
}

# openai/clip-vit-large-patch14 text model (SD1.5's encoder, SDXL's first).
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# laion/CLIP-ViT-bigG-14 text model (SDXL's second encoder, with its projection).
OPENCLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# The SD VAE (SD1.5's and SDXL's share the shape; SDXL's latents are scaled by 0.13025).
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# Small stand-ins: the same module trees, narrow (the smoke runs and the CPU bench's frozen parts).
TINY_VAE: dict[str, Any] = SD_VAE | {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8}
_TINY_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_SD15_UNET: dict[str, Any] = SD15_UNET | {
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
TINY_SDXL_UNET: dict[str, Any] = SDXL_UNET | {
    "block_out_channels": (32, 64, 64),
    "transformer_layers_per_block": (1, 1, 2),  # SDXL's 1/2/10 deep costs the smoke runs seconds of peft set-up
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64,  # both tiny encoders' 32-wide states side by side
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}


@dataclass(frozen=True)
class Architecture:
    """A base model's shape: UNet, text encoder(s) (SDXL's second has the projection) and VAE configs."""

    name: str
    sdxl: bool
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    vae: dict[str, Any]
    notes: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture("sd15", False, SD15_UNET, (CLIP_L,), SD_VAE, "SD1.5 at full size"),
    "sdxl": Architecture(
        "sdxl", True, SDXL_UNET, (CLIP_L, OPENCLIP_BIGG), SD_VAE | {"sample_size": 1024, "scaling_factor": 0.13025}
    ),
    # The CPU bench: SD1.5's UNet at full width; a 2-layer 768-wide text encoder (its outputs are cached) and a
    # tiny VAE (it only encodes each image once).
    "sd15-mid": Architecture(
        "sd15-mid",
        False,
        SD15_UNET,
        (
            _TINY_TEXT
            | {"hidden_size": 768, "intermediate_size": 256, "num_attention_heads": 12, "projection_dim": 768},
        ),
        TINY_VAE,
        "SD1.5 UNet at full width, tiny VAE and text encoder",
    ),
    "sd15-tiny": Architecture("sd15-tiny", False, TINY_SD15_UNET, (_TINY_TEXT,), TINY_VAE, "SD1.5's tree, 32 wide"),
    "sdxl-tiny": Architecture(
        "sdxl-tiny", True, TINY_SDXL_UNET, (_TINY_TEXT, _TINY_TEXT), TINY_VAE, "SDXL's blocks, 32-64 wide, shallow"
    ),
}


def build_unet(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The UNet alone, seeded: the same seed gives the same weights (the reference loop's fresh copy)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**arch.unet)


def build_base(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu") -> BaseModel:
    """A `BaseModel` of `arch` with seeded random weights, built on `device` (a GPU builds in seconds).

    The tokenizer is the project's offline CLIP tokenizer (one token per
    character); token ids stay below 514, so a full 49408-row embedding works.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_core.tiny_models import _clip_tokenizer

    unet = build_unet(arch, seed, device)
    tokenizers, encoders = [], []
    for index, text in enumerate(arch.text_encoders):
        tokenizer = _clip_tokenizer()
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = CLIPTextConfig(**text, **ids, pad_token_id=tokenizer.eos_token_id)
        with_projection = arch.sdxl and index == 1
        torch.manual_seed(seed + 1 + index)
        with torch.device(device):
            encoders.append((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))
        tokenizers.append(tokenizer)
    torch.manual_seed(seed + 10)
    with torch.device(device):
        vae = AutoencoderKL(**arch.vae)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    return BaseModel(
        spec=f"bench:{arch.name}",
        sdxl=arch.sdxl,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=sd_noise_scheduler(),
        pipeline_class=StableDiffusionXLPipeline if arch.sdxl else StableDiffusionPipeline,
    )


def fingerprint(module: torch.nn.Module) -> float:
    """A float64 sum of every weight: equal for two copies of the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


# --- A subject folder (the tests' helpers, copied so the benches do not import tests) -------------


def photo(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth random structure, distinct per seed (perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def make_subject(
    root: Path, config: LoraConfig, side: int, count: int, repeats: int, token: str = "b3nch"
) -> SubjectLayout:
    """`count` square photos of `side` px with their own captions, ingested, bucketed and captioned.

    An epoch is `count * repeats / batch` steps; the photos share one bucket.
    Photos smaller than the config's resolution get a bucket of their own size
    (`bucket_no_upscale`): that is how the CPU bench trains below the config's
    256 px floor. BLIP is never loaded: every photo brings its caption.
    """
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        photo((side, side), 70 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man in a suit, photo {i}")
    layout = SubjectLayout(root / "work", token)
    settings = IngestSettings(min_short_side=min(256, side), min_images=1, near_duplicate_distance=0)
    ingest(photos, layout, settings, num_repeats=repeats, show_progress=False)
    bucket_subject(layout, BucketPlan.from_config(config), config.train_batch_size)
    no_blip = "bench:no-blip"  # never loaded (all captions are the user's); names the captions' source
    caption_subject(
        layout,
        config.captioning.model_copy(update={"model": no_blip}),
        captioner=BlipCaptioner(no_blip),
        show_progress=False,
    )
    return layout


# --- The plain reference ---------------------------------------------------------------------


@dataclass
class BareInputs:
    """The subject's training inputs, made once the plain way: VAE latents, token ids, text states."""

    latents: torch.Tensor  # [n, 4, h, w], scaled, fp32, on the device
    input_ids: list[torch.Tensor]  # per tokenizer, [n, 77]
    hidden: torch.Tensor  # the text condition of frozen encoders, fp32
    pooled: torch.Tensor | None  # SDXL's pooled embedding
    time_ids: torch.Tensor | None  # SDXL's size conditioning, [n, 6]


def _encode(base: BaseModel, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD1.5: the last layer; SDXL: both encoders' penultimate layers side by side and bigG's pooled output."""
    if not base.sdxl:
        return base.text_encoders[0](input_ids[0]).last_hidden_state, None
    first = base.text_encoders[0](input_ids[0], output_hidden_states=True).hidden_states[-2]
    second = base.text_encoders[1](input_ids[1], output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


@torch.no_grad()
def bare_inputs(base: BaseModel, layout: SubjectLayout, device: str | torch.device) -> BareInputs:
    """Encode the subject's bucketed photos and captions with the base model in fp32 (before training casts it)."""
    device = torch.device(device)
    assignments = read_buckets(layout.buckets_csv)
    pixels, captions = [], []
    for assignment in assignments:
        image_path = layout.root / assignment.image
        with Image.open(image_path) as image:
            picture = apply_bucket(image.convert("RGB"), assignment)
        pixels.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(read_caption(image_path.with_suffix(".txt"))[0])
    vae = base.vae.to(device, torch.float32)
    latents = vae.encode(torch.stack(pixels).to(device)).latent_dist.mean * vae.config.scaling_factor
    input_ids = [
        tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
        for tok in base.tokenizers
    ]
    for encoder in base.text_encoders:
        encoder.to(device, torch.float32)
    hidden, pooled = _encode(base, input_ids)
    time_ids = None
    if base.sdxl:
        rows = [
            [a.original_height, a.original_width, a.crop_top, a.crop_left, a.bucket_height, a.bucket_width]
            for a in assignments
        ]
        time_ids = torch.tensor(rows, dtype=torch.float32, device=device)
    # Contiguous (NCHW) as our trainer's cache: the VAE's output on the CPU is channels-last, and a UNet fed
    # channels-last runs in that layout throughout, which is a different (on the CPU, faster) computation.
    latents = latents.float().contiguous()
    return BareInputs(latents, input_ids, hidden.float(), None if pooled is None else pooled.float(), time_ids)


def _autocast(device: torch.device, precision: str) -> Any:
    return nullcontext() if precision == "no" else torch.autocast(device.type, dtype=_DTYPES[precision])


class BareLoop:
    """The LoRA step the plain way, on a base model nothing else has touched.

    Frozen weights in the training dtype, peft LoRA (fp32) on kohya's target
    modules, `torch.autocast`, a `GradScaler` for fp16, gradient clipping at 1,
    AdamW (or bitsandbytes' AdamW8bit), DDPM noise and an MSE loss; the loss is
    read back every step, as any loop that logs it does.
    """

    def __init__(
        self,
        base: BaseModel,
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
        dtype = _DTYPES[precision]
        names = ["text_encoder", "text_encoder_2"][: len(base.text_encoders)]
        trained = {"unet": base.unet} | (dict(zip(names, base.text_encoders, strict=True)) if self.train_text else {})
        targets = kohya_targets(trained, base.sdxl)
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
        with _autocast(self.device, self.precision):
            if self.train_text:
                hidden, pooled = _encode(self.base, [ids[index] for ids in self.inputs.input_ids])
            else:
                hidden = self.inputs.hidden[index]
                pooled = None if self.inputs.pooled is None else self.inputs.pooled[index]
            extra = {}
            if self.base.sdxl:
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


# --- Measuring ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepClock:
    """Times training steps by the UNet's forward calls (one per step), whoever runs the loop.

    Hooks on the UNet see the same event in our trainer and in the plain loop,
    without depending on the trainer's internals. Steps before `warmup` + 1 are
    not timed; the clock starts at the UNet call of the first timed step and
    stops at `stop()` (after the last step). On the CPU it also sums the time
    spent inside the UNet's forward, to tell forward from the rest of a step.
    """

    unet: torch.nn.Module
    warmup: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calls: int = 0
    forward: float = 0.0
    started: float | None = None
    seconds: float = 0.0
    _entered: float = 0.0
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handles = [
            self.unet.register_forward_pre_hook(self._pre),
            self.unet.register_forward_hook(self._post),
        ]

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1
        if self.calls == self.warmup + 1:
            _sync(self.device)
            self.started = time.perf_counter()
        self._entered = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.started is not None:
            self.forward += time.perf_counter() - self._entered

    def stop(self) -> StepClock:
        _sync(self.device)
        if self.started is None:
            raise RuntimeError(f"only {self.calls} step(s) ran; the clock needs more than {self.warmup}")
        self.seconds = time.perf_counter() - self.started
        for handle in self._handles:
            handle.remove()
        return self

    @property
    def steps(self) -> int:
        return self.calls - self.warmup

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


@contextmanager
def timed(device: torch.device) -> Iterator[list[float]]:
    """`with timed(device) as t:` ... then `t[0]` is the seconds taken (the device synchronised)."""
    out: list[float] = []
    _sync(device)
    start = time.perf_counter()
    yield out
    _sync(device)
    out.append(time.perf_counter() - start)


def precision_name(trainer: Any) -> str:
    """The precision the trainer really uses (after any fallback)."""
    return trainer.precision.name


def all_finite(values: list[float]) -> bool:
    return bool(values) and all(np.isfinite(values))


def epoch_boundary(trainer: Any, stats: Any, repeats: int = 3) -> dict[str, Any]:
    """Seconds of the work between two epoch tasks: `save_epoch` and the epoch's markdown artifact.

    The artifact is built by `tasks.artifacts.publish_epoch` itself, with
    Prefect's `create_markdown_artifact` replaced by a function that keeps the
    markdown: sending it needs a Prefect server and is not measured. The
    median of `repeats` runs, each writing the same epoch's files again.
    """
    from unittest import mock

    import tasks.artifacts

    run_key = "b" * 64
    info = {
        "session_id": "0",
        "started_at": str(time.time()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "network_weights": "",
    }
    from lora_core.run_state import save_epoch as save

    kept: list[dict[str, Any]] = []
    saves, artifacts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        path = save(trainer, run_key, info, stats)
        saves.append(time.perf_counter() - start)
        with mock.patch.object(tasks.artifacts, "create_markdown_artifact", lambda **kw: kept.append(kw)):
            start = time.perf_counter()
            tasks.artifacts.publish_epoch(trainer.layout.token, stats.epoch, stats.losses, stats.lrs, path)
            artifacts.append(time.perf_counter() - start)
    lora_bytes = Path(path).stat().st_size if path else 0
    return {
        "save_epoch_s": float(np.median(saves)),
        "artifact_s": float(np.median(artifacts)),
        "lora_bytes": lora_bytes,
        "markdown_chars": len(kept[-1]["markdown"]) if kept else 0,
    }


@torch.no_grad()
def sample_decodes(
    base: BaseModel, inputs: BareInputs, precision: str, device: str | torch.device, steps: int = 4
) -> bool:
    """Denoise one latent with the trained UNet (DDIM, the training precision), decode it with the VAE in fp32.

    True when every pixel is finite. The VAE runs in fp32 outside autocast, as
    our renderer decodes (SDXL's VAE overflows in fp16).
    """
    from diffusers import DDIMScheduler

    device = torch.device(device)
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn((1, *inputs.latents.shape[1:]), generator=generator, device=device)
    extra = {}
    if base.sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": inputs.pooled[:1], "time_ids": inputs.time_ids[:1]}}
    was_training = base.unet.training
    base.unet.eval()
    with _autocast(device, precision):
        for t in scheduler.timesteps:
            noise = base.unet(latents, t.to(device), inputs.hidden[:1], **extra).sample
            latents = scheduler.step(noise.float(), t, latents).prev_sample
    base.unet.train(was_training)
    vae = base.vae
    home = next(vae.parameters()).device
    vae.to(device, torch.float32)
    with torch.autocast(device.type, enabled=False):
        image = vae.decode(latents.float() / vae.config.scaling_factor).sample
    vae.to(home)
    return bool(torch.isfinite(image).all())
