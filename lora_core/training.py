"""Training a LoRA: kohya's default network as peft layers, and the epoch loop.

The network trains exactly the modules sd-scripts' default LoRA trains (see
`lora_io`), with peft's `lora_A`/`lora_B` initialised as kohya initialises
`lora_down`/`lora_up` (Kaiming-uniform and zeros), so the file we write is the
file kohya would write.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_bytes

from lora_core.buckets import BucketAssignment, apply_bucket, read_buckets
from lora_core.captioning import read_caption
from lora_core.config import LoraConfig, Optimizer, format_optimizer_args
from lora_core.fs import atomic_write_bytes, ensure_inside
from lora_core.layout import SubjectLayout
from lora_core.lora_io import LoraFile, LoraTarget, kohya_targets, save_lora, tag_frequency
from lora_core.models import BaseModel

__all__ = [
    "EpochStats",
    "LoadReport",
    "LoraNetwork",
    "TrainItem",
    "Trainer",
    "apply_steps",
    "begin_run",
    "epoch_batches",
    "epoch_done",
    "finished_epoch",
    "oom_step",
    "publish_final",
    "read_steps",
    "record_steps",
    "run_info",
    "run_key",
    "save_epoch",
    "shuffle_tags",
    "state_file",
    "training_items",
]


@dataclass(frozen=True)
class LoadReport:
    """How an existing LoRA file matched the network it was loaded into."""

    loaded: int
    missing: list[str]  # our modules the file has no weights for (they start fresh)
    unexpected: list[str]  # the file's modules we do not train (ignored)


class LoraNetwork:
    """kohya's default LoRA on `base`: peft layers in the UNet and, if asked, the text encoder(s)."""

    def __init__(self, base: BaseModel, rank: int, alpha: float, train_text_encoder: bool = True) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.rank, self.alpha, self.sdxl = int(rank), float(alpha), base.sdxl
        self.components = base.components if train_text_encoder else {"unet": base.unet}
        self.targets: list[LoraTarget] = kohya_targets(self.components, base.sdxl)
        for component, root in self.components.items():
            paths = [t.path for t in self.targets if t.component == component]
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=paths, init_lora_weights=True)
            inject_adapter_in_model(config, root)
            root.requires_grad_(False)
            for target in (t for t in self.targets if t.component == component):
                for param in self._pair(target):
                    param.requires_grad_(True)

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
        """Start from an existing kohya-format LoRA (ours or kohya's): the seed's way to resume.

        A file with another alpha/rank ratio is rescaled into `up`, so the
        network computes the same update the file describes, times `strength`
        (the `<lora:name:0.8>` weight of AUTOMATIC1111; 0 gives the base model).
        Modules the file lacks get a zero update, as a fresh network has.
        """
        ours = {t.name: t for t in self.targets}
        # Also accept SDXL files that name UNet modules the diffusers way (both load everywhere).
        if self.sdxl:
            from lora_core.lora_io import kohya_name

            ours |= {kohya_name(t.component, t.path, True, sgm=False): t for t in self.targets}
        loaded, unexpected = set(), []
        with torch.no_grad():
            for name, (down, up, alpha) in lora.modules.items():
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


# --- Data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainItem:
    """One training image: its bucket cut, its caption, and how often an epoch shows it."""

    assignment: BucketAssignment
    caption: str
    repeats: int


def training_items(layout: SubjectLayout, caption_extension: str = ".txt") -> list[TrainItem]:
    """The images of `buckets.csv` with their captions; repeats from the folder name, as kohya reads them."""
    items = []
    for assignment in read_buckets(layout.buckets_csv):
        image = ensure_inside(layout.root, layout.root / assignment.image)
        caption_path = image.with_suffix(caption_extension)
        if not caption_path.is_file():
            raise FileNotFoundError(f"{caption_path}: no caption; run the captions stage first")
        repeats = int(image.parent.name.split("_", 1)[0]) if image.parent.name.split("_", 1)[0].isdigit() else 1
        items.append(TrainItem(assignment, read_caption(caption_path)[0], repeats))
    if not items:
        raise ValueError(f"{layout.buckets_csv}: no images to train on")
    return items


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: shuffle the comma-separated tags after the first `keep_tokens`."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


def epoch_batches(items: list[TrainItem], batch_size: int, seed: int) -> list[list[int]]:
    """Indices of one epoch's batches: each image `repeats` times, batches within one bucket, shuffled.

    Seeded per epoch, so a resumed run sees the same order it would have seen.
    """
    rng = random.Random(seed)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.assignment.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


# --- The trainer ---------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one epoch did: per-step loss and learning rate."""

    epoch: int
    global_step: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


def _device_and_precision(config: LoraConfig, device: str | None) -> tuple[str, str, list[str]]:
    notes: list[str] = []
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = config.mixed_precision.value
    if device == "cpu" and precision != "no":
        notes.append(f"mixed_precision {precision} needs a GPU: training in fp32 on the CPU")
        precision = "no"
    return device, precision, notes


class Trainer:
    """One LoRA run: the base model and data loaded once, trained epoch by epoch.

    State that a new process needs to continue (LoRA weights in fp32, optimizer
    moments, step, noise RNG) is saved per epoch as safetensors, never pickled;
    the LR schedule is rebuilt and stepped to the saved step.
    """

    def __init__(
        self,
        config: LoraConfig,
        base: BaseModel,
        layout: SubjectLayout,
        *,
        device: str | None = None,
        show_progress: bool = True,
    ) -> None:
        from accelerate import Accelerator

        self.config, self.base, self.layout, self.show_progress = config, base, layout, show_progress
        self.device, self.precision, self.notes = _device_and_precision(config, device)
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=self.device == "cpu",
        )
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        self.network = LoraNetwork(base, config.network_dim, config.network_alpha, config.train_text_encoder)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        for component in base.components.values():
            component.to(self.accelerator.device, dtype=weight_dtype)
        for param in self.network.parameters():  # the trained weights stay in fp32
            param.data = param.data.float()
        base.vae.to(self.accelerator.device, dtype=torch.float32).requires_grad_(False)
        if config.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for encoder in base.text_encoders:
                # transformers 5 renamed it; older releases only have the first name.
                enable = (
                    getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                )
                enable()
        if config.v_parameterization:
            base.noise_scheduler.register_to_config(prediction_type="v_prediction")
        self.items = training_items(layout, config.caption_extension)
        self.latents = self._cache_latents()
        self.text = self._cache_text()
        self.steps_per_epoch = math.ceil(
            len(epoch_batches(self.items, config.train_batch_size, 0)) / config.gradient_accumulation_steps
        )
        self.optimizer = self._optimizer()
        self.total_steps = self.steps_per_epoch * config.max_train_epochs
        self.lr_scheduler = self._scheduler(start=0)
        self.noise = torch.Generator().manual_seed(config.seed)
        self.epoch, self.global_step = 0, 0

    # -- set-up --

    def _cache_latents(self) -> list[torch.Tensor]:
        """Each image, cut to its bucket and encoded by the VAE once (the distribution's mean).

        With `cache_latents_to_disk`, each is also kept beside its image as
        `<image>.latents.safetensors` and reused by later runs while the image,
        its bucket and the VAE are the same.
        """
        from PIL import Image
        from safetensors import safe_open

        vae = self.base.vae
        vae_id = hashlib.sha256(
            (json.dumps(dict(vae.config), sort_keys=True, default=str) + self.base.spec).encode()
        ).hexdigest()
        out = []
        for item in self.items:
            image_path = self.layout.root / item.assignment.image
            cache = image_path.with_name(image_path.stem + ".latents.safetensors")
            key = {
                "image": hashlib.sha256(image_path.read_bytes()).hexdigest(),
                "vae": vae_id,
                "bucket": json.dumps(asdict(item.assignment), sort_keys=True),
            }
            if self.config.cache_latents_to_disk and cache.is_file():
                try:
                    with safe_open(str(cache), framework="pt") as handle:
                        if handle.metadata() == key:
                            out.append(handle.get_tensor("latents"))
                            continue
                except Exception:
                    pass  # damaged or foreign: encode again
            with Image.open(image_path) as image:
                picture = apply_bucket(image.convert("RGB"), item.assignment)
            pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            with torch.no_grad():
                dist = vae.encode(pixels[None].to(self.accelerator.device)).latent_dist
            latents = (dist.mean * vae.config.scaling_factor)[0].float().cpu().contiguous()
            if self.config.cache_latents_to_disk:
                atomic_write_bytes(cache, save_bytes({"latents": latents}, key))
            out.append(latents)
        return out

    def _cache_text(self) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """Text-encoder outputs per image, once, when nothing about them changes while training."""
        if self.config.train_text_encoder or self.config.shuffle_caption:
            return None
        with torch.no_grad():
            return [self._encode_text([item.caption]) for item in self.items]

    def _optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        groups = [{"params": self.network.parameters("unet"), "lr": config.unet_lr}]
        text = [p for c in ("text_encoder", "text_encoder_2") for p in self.network.parameters(c)]
        if text:
            groups.append({"params": text, "lr": config.text_encoder_lr})
        args = dict(config.optimizer_args)
        if config.optimizer == Optimizer.AdamW8bit:
            if self.device.startswith("cuda"):
                import bitsandbytes

                return bitsandbytes.optim.AdamW8bit(groups, **args)
            self.notes.append("AdamW8bit needs a GPU (bitsandbytes): using torch AdamW on the CPU")
            return torch.optim.AdamW(groups, **args)
        if config.optimizer == Optimizer.Adafactor:
            from transformers.optimization import Adafactor

            args = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | args
            return Adafactor(groups, **args)
        return torch.optim.AdamW(groups, **args)

    def _scheduler(self, start: int) -> Any:
        from diffusers.optimization import get_scheduler

        config = self.config
        scheduler = get_scheduler(
            config.lr_scheduler.value,
            self.optimizer,
            num_warmup_steps=round(self.total_steps * config.lr_warmup / 100),
            num_training_steps=self.total_steps,
            num_cycles=config.lr_scheduler_num_cycles,
        )
        with warnings.catch_warnings():  # replaying steps without optimizer steps is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):  # the schedule is a pure function of the step: replay it
                scheduler.step()
        return scheduler

    # -- one step --

    def _token_chunks(self, tokenizer: Any, captions: list[str]) -> list[torch.Tensor]:
        """Captions as 77-token windows: BOS, up to 75 tokens, EOS, padding; one window per 75 tokens.

        `max_token_length` 150 or 225 (kohya's setting) gives 2 or 3 windows, each
        encoded alone and joined along the sequence, so long captions are not cut at 75.
        """
        windows = self.config.max_token_length // 75
        bodies = [ids[: 75 * windows] for ids in tokenizer(captions, add_special_tokens=False, verbose=False).input_ids]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        chunks = []
        for window in range(windows):
            rows = []
            for body in bodies:
                piece = body[75 * window : 75 * (window + 1)]
                rows.append([tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (75 - len(piece)))
            chunks.append(torch.tensor(rows, device=self.accelerator.device))
        return chunks

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base
        if not base.sdxl:
            encoder = base.text_encoders[0]
            states = []
            for ids in self._token_chunks(base.tokenizers[0], captions):
                out = encoder(ids, output_hidden_states=True)
                if self.config.clip_skip > 1:
                    hidden = out.hidden_states[-self.config.clip_skip]
                    states.append(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
                else:
                    states.append(out.last_hidden_state)
            return torch.cat(states, dim=1), None
        # SDXL: the penultimate layer of both encoders side by side, and the second one's pooled output.
        states, pooled = [], None
        chunks = zip(*(self._token_chunks(tok, captions) for tok in base.tokenizers), strict=True)
        for ids_first, ids_second in chunks:
            first = base.text_encoders[0](ids_first, output_hidden_states=True).hidden_states[-2]
            second = base.text_encoders[1](ids_second, output_hidden_states=True)
            states.append(torch.cat([first, second.hidden_states[-2]], dim=-1))
            pooled = second.text_embeds if pooled is None else pooled  # the first window's, as kohya does
        return torch.cat(states, dim=1), pooled

    def _text_for(self, batch: list[int], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text is None:
            return self._encode_text(captions)
        hidden = torch.cat([self.text[i][0] for i in batch])
        pooled = torch.cat([self.text[i][1] for i in batch]) if self.base.sdxl else None
        return hidden, pooled

    def _time_ids(self, batch: list[int]) -> torch.Tensor:
        """SDXL's size conditioning: original size, crop top-left, target size (height first)."""
        rows = []
        for index in batch:
            a = self.items[index].assignment
            rows.append([a.original_height, a.original_width, a.crop_top, a.crop_left, a.bucket_height, a.bucket_width])
        return torch.tensor(rows, dtype=torch.float32, device=self.accelerator.device)

    def _loss(self, batch: list[int], caption_rng: random.Random) -> torch.Tensor:
        config, base, device = self.config, self.base, self.accelerator.device
        latents = torch.stack([self.latents[i] for i in batch]).to(device)
        captions = [self.items[i].caption for i in batch]
        if config.shuffle_caption:
            captions = [shuffle_tags(c, config.keep_tokens, caption_rng) for c in captions]
        noise = torch.randn(latents.shape, generator=self.noise).to(device)
        if config.noise_offset:
            noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=self.noise).to(device)
        schedule = base.noise_scheduler
        steps = torch.randint(0, schedule.config.num_train_timesteps, (len(batch),), generator=self.noise).to(device)
        noisy = schedule.add_noise(latents, noise, steps)
        v_prediction = schedule.config.prediction_type == "v_prediction"
        target = schedule.get_velocity(latents, noise, steps) if v_prediction else noise
        with self.accelerator.autocast():
            hidden, pooled = self._text_for(batch, captions)
            extra = (
                {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._time_ids(batch)}} if base.sdxl else {}
            )
            prediction = base.unet(noisy, steps, hidden, **extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            alphas = schedule.alphas_cumprod.to(device)[steps]
            snr = alphas / (1 - alphas)
            weight = snr.clamp(max=config.min_snr_gamma) / (snr + 1 if v_prediction else snr)
            loss = loss * weight
        return loss.mean()

    # -- measuring --

    @torch.no_grad()
    def validation_loss(self, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), seed: int = 0) -> float:
        """Loss on every training image at fixed timesteps with fixed noise: comparable across epochs.

        The training loss draws timesteps at random and is too noisy to show
        learning over a few steps; this one is deterministic (no min-SNR weight,
        no shuffling), as sd-scripts' and OneTrainer's validation loss are.
        """
        base, device = self.base, self.accelerator.device
        for module in base.components.values():
            module.eval()
        generator = torch.Generator().manual_seed(seed)
        schedule = base.noise_scheduler
        v_prediction = schedule.config.prediction_type == "v_prediction"
        total, count = 0.0, 0
        for index, latents in enumerate(self.latents):
            latents = latents[None].to(device)
            hidden, pooled = self._encode_text([self.items[index].caption])
            extra = (
                {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._time_ids([index])}} if base.sdxl else {}
            )
            for step in timesteps:
                noise = torch.randn(latents.shape, generator=generator).to(device)
                t = torch.tensor([step], device=device)
                target = schedule.get_velocity(latents, noise, t) if v_prediction else noise
                with self.accelerator.autocast():
                    prediction = base.unet(schedule.add_noise(latents, noise, t), t, hidden, **extra).sample
                total += float(torch.nn.functional.mse_loss(prediction.float(), target.float()))
                count += 1
        return total / count

    # -- an epoch --

    def run_epoch(self, epoch: int, on_step: Callable[[int, float, float], None] | None = None) -> EpochStats:
        """Train epoch `epoch` (1-based); the trainer must have finished epoch - 1.

        `on_step(global_step, loss, lr)` is called after every optimizer step.
        """
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} asked for after epoch {self.epoch}; load that epoch's state first")
        from rich.progress import Progress

        config = self.config
        params = self.network.parameters()
        stats = EpochStats(epoch, self.global_step)
        caption_rng = random.Random(config.seed * 1000 + epoch)
        batches = epoch_batches(self.items, config.train_batch_size, config.seed * 1000 + epoch)
        for module in self.base.components.values():
            module.train()
        with Progress(disable=not self.show_progress, transient=True) as progress:
            bar = progress.add_task(f"train: epoch {epoch}", total=len(batches))
            for batch in batches:
                with self.accelerator.accumulate(*self.base.components.values()):
                    loss = self._loss(batch, caption_rng)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(params, 1.0)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if self.accelerator.sync_gradients:
                    self.lr_scheduler.step()
                    self.global_step += 1
                    stats.losses.append(float(loss.detach()))
                    stats.lrs.append(float(self.lr_scheduler.get_last_lr()[0]))
                    if on_step is not None:
                        on_step(self.global_step, stats.losses[-1], stats.lrs[-1])
                progress.advance(bar)
        self.epoch, stats.global_step = epoch, self.global_step
        return stats

    # -- saving and resuming --

    def save_state(self, path: Path) -> None:
        """Everything a new process needs to continue after this epoch, as one safetensors file."""
        tensors: dict[str, torch.Tensor] = {}
        for name, (down, up) in self.network.weights().items():
            tensors[f"lora.{name}.down"], tensors[f"lora.{name}.up"] = down.float().cpu(), up.float().cpu()
        state = self.optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for index, slots in state["state"].items():
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        tensors["rng.noise"] = self.noise.get_state()
        meta = {
            "epoch": str(self.epoch),
            "global_step": str(self.global_step),
            "optimizer_scalars": json.dumps(scalars),
            "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]),
        }
        atomic_write_bytes(Path(path), save_bytes(tensors, meta))

    def load_state(self, path: Path) -> None:
        """Continue after the epoch saved at `path` (by this code, for this run)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        targets = {t.name: t for t in self.network.targets}
        with torch.no_grad():
            for name, target in targets.items():
                down, up = self.network._pair(target)
                down.copy_(tensors[f"lora.{name}.down"])
                up.copy_(tensors[f"lora.{name}.up"])
        state = self.optimizer.state_dict()
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value.to(self.accelerator.device)
        for key, value in json.loads(meta["optimizer_scalars"]).items():
            index, slot = key.split(".", 1)
            slots.setdefault(int(index), {})[slot] = value
        groups = json.loads(meta["param_groups"])
        for group, saved in zip(state["param_groups"], groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        self.noise.set_state(tensors["rng.noise"])
        self.epoch, self.global_step = int(meta["epoch"]), int(meta["global_step"])
        self.lr_scheduler = self._scheduler(start=self.global_step)

    # -- kohya's metadata --

    def metadata(self, epoch: int, run_info: dict[str, str]) -> dict[str, str]:
        """The `ss_*` and `modelspec.*` metadata sd-scripts writes, so tools that read it show our runs."""
        config, base = self.config, self.base
        token = self.layout.token
        folders: dict[str, dict[str, int]] = {}
        for item in self.items:
            folder = Path(item.assignment.image).parent.name
            entry = folders.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        buckets: dict[str, int] = {}
        for item in self.items:
            label = f"{item.assignment.bucket_width}x{item.assignment.bucket_height}"
            buckets[label] = buckets.get(label, 0) + 1
        optimizer = type(self.optimizer)
        args = format_optimizer_args(config.optimizer_args)
        text_lr = config.text_encoder_lr if config.train_text_encoder else None
        meta: dict[str, Any] = {
            "ss_session_id": run_info["session_id"],
            "ss_training_started_at": run_info["started_at"],
            "ss_training_finished_at": str(time.time()),
            "ss_output_name": token,
            "ss_sd_model_name": Path(base.spec).name if Path(base.spec).exists() else base.spec,
            "ss_base_model_version": base.version,
            "ss_v2": str(base.version.startswith("sd_v2")),
            "ss_network_module": "networks.lora",
            "ss_network_dim": config.network_dim,
            "ss_network_alpha": float(config.network_alpha),
            "ss_network_dropout": None,
            "ss_learning_rate": config.unet_lr,
            "ss_unet_lr": config.unet_lr,
            "ss_text_encoder_lr": text_lr,
            "ss_optimizer": f"{optimizer.__module__}.{optimizer.__name__}" + (f"({args})" if args else ""),
            "ss_lr_scheduler": config.lr_scheduler.value,
            "ss_lr_warmup_steps": round(self.total_steps * config.lr_warmup / 100),
            "ss_max_train_steps": self.total_steps,
            "ss_num_epochs": config.max_train_epochs,
            "ss_epoch": epoch,
            "ss_steps": self.global_step,
            "ss_num_batches_per_epoch": self.steps_per_epoch,
            "ss_num_train_images": sum(item.repeats for item in self.items),
            "ss_num_reg_images": 0,
            "ss_batch_size_per_device": config.train_batch_size,
            "ss_total_batch_size": config.train_batch_size * config.gradient_accumulation_steps,
            "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
            "ss_gradient_checkpointing": config.gradient_checkpointing,
            "ss_mixed_precision": self.precision,
            "ss_full_fp16": False,
            "ss_resolution": (config.resolution, config.resolution),
            "ss_enable_bucket": config.enable_bucket,
            "ss_min_bucket_reso": config.min_bucket_reso,
            "ss_max_bucket_reso": config.max_bucket_reso,
            "ss_bucket_no_upscale": config.bucket_no_upscale,
            "ss_bucket_info": json.dumps({"buckets": buckets}),
            "ss_clip_skip": config.clip_skip,
            "ss_max_token_length": config.max_token_length,
            "ss_cache_latents": True,
            "ss_seed": config.seed,
            "ss_noise_offset": config.noise_offset or None,
            "ss_min_snr_gamma": config.min_snr_gamma or None,
            "ss_shuffle_caption": config.shuffle_caption,
            "ss_keep_tokens": config.keep_tokens,
            "ss_flip_aug": config.flip_aug,
            "ss_color_aug": False,
            "ss_random_crop": False,
            "ss_dataset_dirs": json.dumps(folders),
            "ss_tag_frequency": tag_frequency_by_folder(self.items),
            "ss_training_comment": config.training_comment
            or f"subject-lora; network_weights: {run_info.get('network_weights') or 'None'}",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"stable-diffusion-{'xl-v1-base' if base.sdxl else 'v1'}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if base.sdxl
            else "diffusers",
            "modelspec.title": token,
            "modelspec.resolution": f"{config.resolution}x{config.resolution}",
            "modelspec.date": run_info.get("date", ""),
        }
        return {key: str(value) for key, value in meta.items()}


def tag_frequency_by_folder(items: list[TrainItem]) -> str:
    """`ss_tag_frequency` over the training folders, as sd-scripts counts it."""
    merged: dict[str, dict[str, int]] = {}
    for item in items:
        folder = Path(item.assignment.image).parent.name
        counts = json.loads(tag_frequency([item.caption], folder))[folder]
        for tag, n in counts.items():
            merged.setdefault(folder, {})[tag] = merged.setdefault(folder, {}).get(tag, 0) + n
    return json.dumps(merged)


# --- A run, epoch by epoch ---------------------------------------------------------------

_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def begin_run(
    layout: SubjectLayout, run_key: str, network_weights: str | None, continues: str | None = None
) -> str | None:
    """Make `result_current/` this run's, and keep the LoRA it starts from inside the run.

    Results of a different earlier run are moved to `result_<date-time>/` first,
    never overwritten: the LoRA being continued often lives in `result_current/`
    itself. A resume round (`continues`: the key of the run it extends) adds its
    epochs beside that run's instead; `.run-key` lists the run and its rounds.
    The starting LoRA is copied into the run's state folder and that copy is
    what training reads, so a resumed run finds it wherever the original went.
    Returns the copy's path (None without a starting LoRA).
    """
    state = layout.train_state(run_key)
    state.mkdir(parents=True, exist_ok=True)
    start = state / "start.safetensors"
    if network_weights and not start.is_file():
        atomic_write_bytes(start, Path(network_weights).read_bytes())
        atomic_write_bytes(state / "start.json", json.dumps({"source": str(Path(network_weights).resolve())}).encode())
    marker = layout.result_current / ".run-key"
    keys = marker.read_text().split() if marker.is_file() else []
    if run_key in keys:
        return str(start) if network_weights else None
    if continues is not None and continues in keys:
        keys.append(run_key)
    else:
        if any(layout.result_current.glob("*.safetensors")):
            archive = layout.root / f"result_{time.strftime('%Y%m%d-%H%M%S')}"
            archive.mkdir(parents=True, exist_ok=False)
            for item in layout.result_current.iterdir():
                item.rename(archive / item.name)
        keys = [run_key]
    atomic_write_bytes(marker, "\n".join(keys).encode())
    return str(start) if network_weights else None


def run_info(layout: SubjectLayout, run_key: str, network_weights: str | None = None) -> dict[str, str]:
    """The run's identity for its metadata (session id, start time, where it started), made once."""
    path = layout.train_state(run_key) / "run.json"
    if path.is_file():
        return json.loads(path.read_text())
    origin = layout.train_state(run_key) / "start.json"
    if origin.is_file():
        network_weights = json.loads(origin.read_text())["source"]
    info = {
        "session_id": str(random.SystemRandom().randint(0, 2**32 - 1)),
        "started_at": str(time.time()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "network_weights": network_weights or "",
    }
    atomic_write_bytes(path, json.dumps(info).encode())
    return info


def state_file(layout: SubjectLayout, run_key: str, epoch: int) -> Path:
    return layout.train_state(run_key) / f"epoch-{epoch:06d}.safetensors"


def save_epoch(trainer: Trainer, run_key: str, info: dict[str, str], stats: EpochStats | None = None) -> Path:
    """Write the finished epoch's LoRA (kohya's file and name) and the state to continue from it.

    The state and the epoch's numbers go first and the LoRA last: an epoch
    counts as done only when its LoRA file is there too, so a crash in between
    redoes the epoch rather than losing it.
    """
    epoch = trainer.epoch
    trainer.save_state(state_file(trainer.layout, run_key, epoch))
    if stats is not None:
        numbers = asdict(stats) | {"notes": trainer.notes}
        atomic_write_bytes(_stats_file(trainer.layout, run_key, epoch), json.dumps(numbers).encode())
    path = trainer.layout.epoch_lora(epoch)
    dtype = _SAVE_DTYPES[trainer.config.save_precision.value]
    save_lora(path, trainer.network.weights(), trainer.config.network_alpha, trainer.metadata(epoch, info), dtype)
    return path


def _stats_file(layout: SubjectLayout, run_key: str, epoch: int) -> Path:
    return layout.train_state(run_key) / f"epoch-{epoch:06d}.json"


def finished_epoch(layout: SubjectLayout, run_key: str, epoch: int) -> dict[str, Any] | None:
    """The numbers of an epoch this run finished before (LoRA, state and numbers on disk), else None.

    A process killed after writing an epoch but before Prefect recorded it
    must not train that epoch again.
    """
    numbers = _stats_file(layout, run_key, epoch)
    if not (epoch_done(layout, run_key, epoch) and numbers.is_file()):
        return None
    try:
        return json.loads(numbers.read_text())
    except ValueError:
        return None


def epoch_done(layout: SubjectLayout, run_key: str, epoch: int) -> bool:
    """Both the epoch's LoRA and its state are on disk (the state written by this run)."""
    return layout.epoch_lora(epoch).is_file() and state_file(layout, run_key, epoch).is_file()


# Settings that never change the trained weights (samples render without touching training's state).
_NOT_IN_RUN_KEY = {
    "captioning",
    "ingest",
    "checks",
    "selection",
    "subject_type",
    "network_weights",
    "training_comment",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "sample_prompts",
    "sample_sampler",
}


def run_key(config: LoraConfig, base_identity: str, layout: SubjectLayout, first_epoch: int = 1) -> str:
    """What makes a run this run: its settings, base model, training data and starting LoRA.

    Caption, ingest and check settings are left out: what they produced is in the data
    (captions.csv holds every image's hash, so a flipped photo changes the key);
    so is the starting LoRA's path: its bytes count, wherever it was moved.
    """
    digest = hashlib.sha256()
    digest.update(config.model_dump_json(exclude=_NOT_IN_RUN_KEY).encode())
    digest.update(base_identity.encode())
    for path in (layout.buckets_csv, layout.captions_csv):
        digest.update(path.read_bytes())
    if config.network_weights:
        digest.update(Path(config.network_weights).read_bytes())
    if first_epoch != 1:  # a resume round: its epochs are numbered on from the run's
        digest.update(f"first_epoch={first_epoch}".encode())
    return digest.hexdigest()


def publish_final(layout: SubjectLayout, epoch: int) -> Path:
    """`result_current/<token>.safetensors`: the chosen epoch under the name users load."""
    atomic_write_bytes(layout.final_lora, layout.epoch_lora(epoch).read_bytes())
    return layout.final_lora


# --- Out of memory: the seed's ladder ----------------------------------------------------


def oom_step(config: LoraConfig, bf16_ok: bool) -> tuple[dict[str, Any], str] | None:
    """The next thing to try after CUDA ran out of memory, as the seed does it by hand; None when spent.

    Latents to disk, then half precision (bf16 where the GPU has it), then the
    batch halved down to 1, then gradient checkpointing.
    """
    if not config.cache_latents_to_disk:
        return {"cache_latents_to_disk": True}, "cache latents to disk"
    if config.mixed_precision.value == "no":
        precision = "bf16" if bf16_ok else "fp16"
        return {"mixed_precision": precision}, f"train in {precision}"
    if config.train_batch_size > 1:
        size = config.train_batch_size // 2
        return {"train_batch_size": size}, f"halve the batch to {size}"
    if not config.gradient_checkpointing:
        return {"gradient_checkpointing": True}, "gradient checkpointing"
    return None


def apply_steps(config: LoraConfig, steps: list[dict[str, Any]]) -> LoraConfig:
    """`config` with the out-of-memory steps taken so far, and a note of them in `training_comment`."""
    if not steps:
        return config
    updates: dict[str, Any] = {}
    for step in steps:
        updates |= step["updates"]
    comment = "out of memory; took: " + ", ".join(step["note"] for step in steps)
    return LoraConfig.model_validate(config.model_dump() | updates | {"training_comment": comment})


def read_steps(layout: SubjectLayout, run_key: str) -> list[dict[str, Any]]:
    path = layout.train_state(run_key) / "oom-steps.json"
    return json.loads(path.read_text()) if path.is_file() else []


def record_steps(layout: SubjectLayout, run_key: str, steps: list[dict[str, Any]]) -> None:
    atomic_write_bytes(layout.train_state(run_key) / "oom-steps.json", json.dumps(steps).encode())
