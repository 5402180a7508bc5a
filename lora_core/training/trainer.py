"""The training loop: one `Trainer` per run, its models and data loaded once, trained epoch by epoch.

The step is the diffusers LoRA recipe, in one precision-aware piece that runs
the same on a GPU and on the CPU (see `lora_core.training.precision`): frozen weights
in the training dtype, LoRA weights and optimizer state in fp32, autocast for
the forward pass, fp16 loss scaling, gradient accumulation over micro-batches.
The other concepts live in their own modules: `network` (the LoRA layers),
`dataset.train_data` (items, batches, latents), the model's family (its
conditioning and its objective: what is noised, what is predicted),
`optim` (optimizer and schedule), `state` (what is on disk), `metadata`
(kohya's `ss_*` keys) and `memory` (the out-of-memory ladder).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lora_core.config.lora_config import LoraConfig
from lora_core.dataset.train_data import Latents, epoch_batches, epoch_seed, shuffle_tags, split_items, training_items
from lora_core.families.family import LoadedModel, TextCondition
from lora_core.families.loading import check_config_matches
from lora_core.foundation.errors import RunFailure
from lora_core.foundation.layout import SubjectLayout
from lora_core.training.memory import free_memory
from lora_core.training.network import LoraNetwork
from lora_core.training.optim import make_optimizer, make_scheduler, param_groups
from lora_core.training.precision import resolve_precision

__all__ = ["FIXED_TIMESTEPS", "MAX_GRAD_NORM", "EpochStats", "NonFiniteLossError", "Trainer"]

# sd-scripts' default max_grad_norm.
MAX_GRAD_NORM = 1.0

# The timesteps of the fixed loss (`Trainer.training_loss`, `Trainer.heldout_loss`): across the schedule.
FIXED_TIMESTEPS = (100, 300, 500, 700, 900)


class NonFiniteLossError(RunFailure, RuntimeError):
    """The loss (or the gradient norm) became NaN or inf: the epoch stops, nothing is saved from it."""


@dataclass
class EpochStats:
    """What one epoch did: per optimizer step, the loss and learning rate; fp16 steps skipped on overflow."""

    epoch: int
    global_step: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


class Trainer:
    """One LoRA run on `base`: trains epoch by epoch; `training.state` saves it and continues it in a new process.

    `device` None means `cuda` when there is one, else the CPU in fp32; an
    explicit device trains in the config's `mixed_precision`, on the CPU too.
    """

    def __init__(
        self,
        config: LoraConfig,
        base: LoadedModel,
        layout: SubjectLayout,
        *,
        device: str | torch.device | None = None,
        show_progress: bool = True,
    ) -> None:
        check_config_matches(config, base)
        self.config, self.base, self.layout, self.show_progress = config, base, layout, show_progress
        self.precision = resolve_precision(config.mixed_precision, device)
        self.device = self.precision.device
        self.notes: list[str] = list(self.precision.notes)
        self.conditioning = base.family.conditioning(base, config)
        self.notes += self.conditioning.notes
        # fp8 or 4-bit frozen weights (the family's memory recipe), before the LoRA wraps its layers.
        self.denoiser_stored = base.family.prepare_denoiser(base, config, self.precision.dtype, self.device)
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        self.network = LoraNetwork(base, config.network_dim, config.network_alpha, config.train_text_encoder)
        self._enable_checkpointing()
        self.objective = base.family.objective(base, config)
        # The images trained on, then those held out (validation_split): indices past the first run on.
        self.items, self.heldout = split_items(
            training_items(layout, config.caption_extension), config.validation_split, config.split_seed
        )
        # One model on the device at a time while the inputs are cached, then the denoiser (sd-scripts'
        # order): the set-up never holds more than training will.
        self._place(base.vae, True, torch.float32)  # fp32: a VAE overflows in fp16
        self.latents = Latents(
            self.items + self.heldout,
            layout,
            base.vae,
            base.spec,
            self.device,
            cache=config.cache_latents,
            to_disk=config.cache_latents_to_disk,
            flip=config.flip_aug,
        )
        if self.latents.cache:
            self._place(base.vae, False)
        for encoder in base.text_encoders:
            self._place(encoder, True, self.precision.dtype)
        self.text = self._cache_text()
        if self.text is not None:
            for encoder in base.text_encoders:
                self._place(encoder, False)
        self._place(base.unet, True, None if self.denoiser_stored else self.precision.dtype)
        self.batches_per_epoch = len(epoch_batches(self.items, config.train_batch_size, 0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * config.max_train_epochs
        groups = param_groups(
            config,
            self.network.parameters("unet"),
            [p for c in ("text_encoder", "text_encoder_2") for p in self.network.parameters(c)],
        )
        self.optimizer, note = make_optimizer(config, groups, self.device)
        self.notes += [note] if note else []
        self.lr_scheduler = make_scheduler(config, self.optimizer, self.total_steps)
        self.scaler = self.precision.grad_scaler()
        self.noise = torch.Generator().manual_seed(config.seed)
        self.epoch, self.global_step = 0, 0
        self.lr_steps = 0  # optimizer steps applied: where the LR schedule is
        if self.device.type == "cuda":  # TF32 for what runs in fp32 (the LoRA's own matmuls, an fp32 run)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # -- set-up --

    def _place(self, module: torch.nn.Module, on_device: bool, dtype: torch.dtype | None = None) -> None:
        """`module` onto the training device (in `dtype`), or off it to the host: the one place models move.

        A component's frozen weights take the training dtype; its LoRA weights stay fp32. What leaves the
        device is freed at once, so the next model has its room.
        """
        if on_device:
            module.to(self.device, dtype=dtype) if dtype is not None else module.to(self.device)
            for component, root in self.base.components.items():
                if root is module:
                    for param in self.network.parameters(component):
                        param.data = param.data.float()
        else:
            module.to("cpu")
            free_memory()

    def _enable_checkpointing(self) -> None:
        if self.config.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            for encoder in self.network.components.values():
                if encoder is not self.base.unet:
                    _checkpoint_text_encoder(encoder)

    def _idle_models(self) -> list[torch.nn.Module]:
        """Models training does not touch once its inputs are cached: they can leave the GPU."""
        idle = [self.base.vae] if self.latents.cache else []
        if self.text is not None:
            idle += self.base.text_encoders
        return idle

    @contextmanager
    def models_on_device(self) -> Iterator[None]:
        """Every model on the device while rendering samples (they need the VAE and text encoders)."""
        idle = self._idle_models() if self.device.type == "cuda" else []
        for module in idle:
            self._place(module, True)
        try:
            yield
        finally:
            for module in idle:
                self._place(module, False)

    def _cache_text(self) -> list[TextCondition] | None:
        """Text-encoder outputs per image, once, when nothing about them changes while training."""
        if self.config.train_text_encoder or self.config.shuffle_caption:
            return None
        with torch.no_grad(), self.precision.autocast():
            return [self.conditioning.encode([item.caption], self.device) for item in self.items + self.heldout]

    def resume_at(self, epoch: int, global_step: int, lr_steps: int | None = None) -> None:
        """Continue after `epoch` at `global_step`, the LR schedule replayed to the `lr_steps` applied
        (default: every step was)."""
        self.epoch, self.global_step = epoch, global_step
        self.lr_steps = global_step if lr_steps is None else lr_steps
        self.lr_scheduler = make_scheduler(self.config, self.optimizer, self.total_steps, start=self.lr_steps)

    # -- one micro-batch --

    def _text_for(self, batch: list[int], captions: list[str]) -> TextCondition:
        if self.text is not None:
            return TextCondition.cat([self.text[i] for i in batch])
        if self.config.train_text_encoder:
            return self.conditioning.encode(captions, self.device)
        with torch.no_grad():  # shuffled tags through frozen encoders: no graph to keep
            return self.conditioning.encode(captions, self.device)

    def _draws(self, size: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps, drawn image by image, so 2 batches of 1 draw exactly what 1 batch of 2 does."""
        config = self.config
        noises, timesteps = [], []
        for _ in range(size):
            noise = torch.randn(shape, generator=self.noise)
            if config.noise_offset:  # https://www.crosslabs.org/blog/diffusion-with-offset-noise
                noise += config.noise_offset * torch.randn((shape[0], 1, 1), generator=self.noise)
            noises.append(noise)
            timesteps.append(self.objective.draw(self.noise, shape))
        return torch.stack(noises).to(self.device), torch.cat(timesteps).to(self.device)

    def _loss(self, batch: list[int], rng: random.Random) -> torch.Tensor:
        """The mean loss of one micro-batch (`rng`: the epoch's tag shuffles and flips)."""
        config, objective = self.config, self.objective
        captions = [self.items[i].caption for i in batch]
        if config.shuffle_caption:
            captions = [shuffle_tags(c, config.keep_tokens, rng) for c in captions]
        flips = [config.flip_aug and rng.random() < 0.5 for _ in batch]
        latents = self.latents.batch(batch, flips, self.noise)
        # Sample noise and a timestep per image, and noise the latents (the forward diffusion process).
        noise, steps = self._draws(len(batch), tuple(latents.shape[1:]))
        noisy, target = objective.noisy(latents, noise, steps), objective.target(latents, noise, steps)
        with self.precision.autocast():
            text = self._text_for(batch, captions)
            kwargs = self.conditioning.unet_kwargs(text, [self.items[i] for i in batch], self.device)
            prediction = self.base.family.predict(self.base, noisy, steps, kwargs)
        prediction = objective.output(prediction, noisy, steps)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return objective.weigh(loss, steps, config.min_snr_gamma).mean()

    # -- an epoch --

    def run_epoch(self, epoch: int, on_step: Callable[[int, float, float], None] | None = None) -> EpochStats:
        """Train epoch `epoch` (1-based); the trainer must have finished epoch - 1.

        `on_step(global_step, loss, lr)` is called after every optimizer step.
        Raises `NonFiniteLossError` naming the step when the loss goes NaN or inf.
        """
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} asked for after epoch {self.epoch}; load that epoch's state first")
        from rich.progress import Progress

        config = self.config
        stats = EpochStats(epoch, self.global_step)
        rng = random.Random(epoch_seed(config.seed, epoch))
        batches = epoch_batches(self.items, config.train_batch_size, epoch_seed(config.seed, epoch))
        groups = [
            batches[i : i + config.gradient_accumulation_steps]
            for i in range(0, len(batches), config.gradient_accumulation_steps)
        ]
        for module in self.network.components.values():
            module.train()
        with Progress(disable=not self.show_progress, transient=True) as progress:
            bar = progress.add_task(f"train: epoch {epoch}", total=len(batches))
            for group in groups:
                loss, applied = self._step(group, rng, epoch, stats)
                if applied:  # the schedule follows the steps taken, not those fp16 overflow skipped
                    self.lr_scheduler.step()
                    self.lr_steps += 1
                self.global_step += 1
                stats.losses.append(loss)
                stats.lrs.append(float(self.lr_scheduler.get_last_lr()[0]))
                if on_step is not None:
                    on_step(self.global_step, loss, stats.lrs[-1])
                progress.advance(bar, len(group))
        self.epoch, stats.global_step = epoch, self.global_step
        return stats

    def _step(self, group: list[list[int]], rng: random.Random, epoch: int, stats: EpochStats) -> tuple[float, bool]:
        """One optimizer step over a group of micro-batches (gradient accumulation): (mean loss, applied).

        The losses stay on the device; the host waits once a step, for the mean loss and the gradient norm
        together, before the optimizer may change anything.
        """
        params = self.network.parameters()
        where = f"epoch {epoch}, step {self.global_step + 1} (step {len(stats.losses) + 1} of the epoch)"
        total = torch.zeros((), device=self.device)
        for batch in group:
            loss = self._loss(batch, rng)
            # Each micro-batch's share of the group's mean; the scaler multiplies the fp16 loss up.
            self.scaler.scale(loss / len(group)).backward()
            total = total + loss.detach().float()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        mean, norm_value = torch.stack([total / len(group), norm.float().to(total.device)]).tolist()
        if not math.isfinite(mean):
            raise NonFiniteLossError(
                f"{where}: the loss is {mean} (mixed_precision {self.precision.name}); "
                "nothing from this epoch is saved, the last epoch's files stay. Try bf16 or fp32, or a lower "
                "learning rate"
            )
        if not self.scaler.is_enabled() and not math.isfinite(norm_value):
            raise NonFiniteLossError(
                f"{where}: the gradient norm is {norm_value} (mixed_precision {self.precision.name}); "
                "nothing from this epoch is saved, the last epoch's files stay"
            )
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed (their norm is not finite)
        self.scaler.update()  # ... and the scale shrinks; it grows back after 2000 good steps
        applied = math.isfinite(norm_value)
        if not applied:
            stats.skipped_steps.append(self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return mean, applied

    # -- measuring --

    def training_loss(self, timesteps: tuple[int, ...] = FIXED_TIMESTEPS, seed: int = 0) -> float:
        """The fixed loss on the images trained on. It falls while they are learned, whether the subject
        is being learned or the photos memorised, so it cannot show over- or undertraining."""
        return self._fixed_loss(range(len(self.items)), timesteps, seed)

    def heldout_loss(self, timesteps: tuple[int, ...] = FIXED_TIMESTEPS, seed: int = 0) -> float | None:
        """The fixed loss on the held-out images (`validation_split`; None without any): sd-scripts' and
        OneTrainer's validation loss. It stops falling when training stops generalising."""
        if not self.heldout:
            return None
        return self._fixed_loss(range(len(self.items), len(self.items) + len(self.heldout)), timesteps, seed)

    @torch.no_grad()
    def _fixed_loss(self, indices: range, timesteps: tuple[int, ...], seed: int) -> float:
        """The loss on the images at `indices` at fixed timesteps with fixed noise: comparable across epochs.

        The training loss draws timesteps at random and is too noisy to show
        learning over a few steps; this one is deterministic (no min-SNR weight,
        no shuffling, no flips), as sd-scripts' and OneTrainer's validation loss are.
        """
        for module in self.base.components.values():
            module.eval()
        generator = torch.Generator().manual_seed(seed)
        objective = self.objective
        every = self.items + self.heldout
        total, count = 0.0, 0
        with self.models_on_device():
            for index in indices:
                item = every[index]
                latents = self.latents.batch([index], [False], torch.Generator().manual_seed(seed))
                with self.precision.autocast():
                    text = self._text_for([index], [item.caption])
                kwargs = self.conditioning.unet_kwargs(text, [item], self.device)
                for step in timesteps:
                    noise = torch.randn(latents.shape, generator=generator).to(self.device)
                    t = objective.at(step).to(self.device)
                    target, noisy = objective.target(latents, noise, t), objective.noisy(latents, noise, t)
                    with self.precision.autocast():
                        prediction = self.base.family.predict(self.base, noisy, t, kwargs)
                    prediction = objective.output(prediction, noisy, t)
                    total += float(torch.nn.functional.mse_loss(prediction.float(), target.float()))
                    count += 1
        return total / count


def _checkpoint_text_encoder(encoder: torch.nn.Module) -> None:
    """Gradient checkpointing that still trains a LoRA inside a frozen text encoder, on every transformers.

    transformers 4 checkpoints re-entrantly by default, and enables input gradients only for models it knows
    carry a peft adapter (`inject_adapter_in_model` does not mark them): the frozen embeddings' output then
    needs no gradient, and a re-entrant checkpoint passes none to the LoRA inside, so the text encoder's
    LoRA silently stops training. Non-re-entrant checkpointing and input gradients, asked for explicitly.
    """
    options = {"use_reentrant": False}
    enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    encoder.enable_input_require_grads()
