"""Sample images during training: fixed prompts and seeds, so epoch N and N+1 differ only by the LoRA.

The recipe's author watches the samples to see the LoRA learn (and to notice
when "the preview images after a while start to be all the same"). We render
the same prompts at the same seeds every time, with the models the trainer
already has in memory (no reload), in eval mode, without touching any random
state training uses, so a run with samples trains exactly as one without.
Files are named as sd-scripts names them; each round also makes one contact
sheet (prompts x seeds) for the Prefect UI.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from lora_core.config.lora_config import Sampler
from lora_core.families.family import LoadedModel
from lora_core.foundation.fs import atomic_output
from lora_core.training.precision import Precision

__all__ = [
    "DEFAULT_PROMPTS",
    "SCHEDULERS",
    "SamplePrompt",
    "SampleSpec",
    "contact_sheet",
    "render",
    "sample_filename",
    "sample_files",
    "sample_step_interval",
    "save_samples",
]

# The recipe's sample prompt first, then a couple that move the subject somewhere new.
DEFAULT_PROMPTS = (
    "{token}, portrait photo",
    "{token}, photo of a person walking in a park, autumn",
    "{token}, oil painting portrait",
)


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt with its own settings; kohya's prompt options set them (`--w --h --s --l --n --d`)."""

    text: str
    negative: str = "lowres, blurry, deformed"
    width: int = 512
    height: int = 512
    steps: int | None = None  # None: the family's default (`ModelFamily.sample_defaults`)
    scale: float | None = None
    seeds: tuple[int, ...] = (1, 2)

    @classmethod
    def parse(cls, line: str, **defaults) -> SamplePrompt:
        """A line of a kohya prompt file: `text --n negative --w 512 --h 768 --s 28 --l 7.5 --d 42`."""
        text, *options = re.split(r"\s--(?=[a-z]\s)", " " + line.strip())
        values = dict(defaults)
        for option in options:
            key, _, value = option.partition(" ")
            value = value.strip()
            try:
                if key == "n":
                    values["negative"] = value
                elif key in ("w", "h"):
                    values["width" if key == "w" else "height"] = max(64, int(value) // 8 * 8)
                elif key == "s":
                    values["steps"] = max(1, int(value))
                elif key == "l":
                    values["scale"] = float(value)
                elif key == "d":
                    values["seeds"] = (int(value),)
            except ValueError:
                raise ValueError(
                    f"sample prompt {line.strip()!r}: option --{key} needs a number, got {value!r}"
                ) from None
        return cls(text=text.strip(), **values)


@dataclass(frozen=True)
class SampleSpec:
    """What to render: the prompts ({token} filled in), each with its size, steps and seeds, and the sampler."""

    prompts: tuple[SamplePrompt, ...]
    sampler: Sampler = Sampler.euler_a

    def __post_init__(self) -> None:
        # A name from a config file ("k_euler") becomes the enum; an unknown one fails here, not mid-render.
        object.__setattr__(self, "sampler", Sampler(self.sampler))

    @classmethod
    def from_config(cls, config, token: str, **defaults) -> SampleSpec:
        """The config's `sample_prompts`, one per line with kohya's options, at the training resolution,
        with its `sample_sampler`."""
        lines = [line.strip() for line in config.sample_prompts.splitlines() if line.strip()]
        defaults = {"width": config.resolution, "height": config.resolution} | defaults
        return cls(
            tuple(SamplePrompt.parse(line.replace("{token}", token), **defaults) for line in lines or DEFAULT_PROMPTS),
            sampler=config.sample_sampler,
        )

    @property
    def seeds(self) -> tuple[int, ...]:
        """Every seed any prompt uses, in order (the contact sheet's columns)."""
        return tuple(dict.fromkeys(seed for prompt in self.prompts for seed in prompt.seeds))


# sd-scripts' `sample_sampler` names: the diffusers scheduler each samples with, and what sets it apart
# (as sd-scripts' `get_my_scheduler` maps them; a `k_` name is an alias of the name without it). Two
# options sd-scripts leaves at diffusers' defaults are set, so every sampler works at any step count:
# PNDM skips its Runge-Kutta warm-up (as SD's own scheduler config does; with it, fewer than 4 steps
# fail), and the deprecated `dpmsolver` algorithm ends at sigma_min (recent diffusers reject "zero").
SCHEDULERS: dict[Sampler, tuple[str, dict[str, Any]]] = {
    Sampler.ddim: ("DDIMScheduler", {}),
    Sampler.pndm: ("PNDMScheduler", {"skip_prk_steps": True}),
    Sampler.lms: ("LMSDiscreteScheduler", {}),
    Sampler.k_lms: ("LMSDiscreteScheduler", {}),
    Sampler.euler: ("EulerDiscreteScheduler", {}),
    Sampler.k_euler: ("EulerDiscreteScheduler", {}),
    Sampler.euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.k_euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.heun: ("HeunDiscreteScheduler", {}),
    Sampler.dpm_2: ("KDPM2DiscreteScheduler", {}),
    Sampler.k_dpm_2: ("KDPM2DiscreteScheduler", {}),
    Sampler.dpm_2_a: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.k_dpm_2_a: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.dpmsolver: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    Sampler.dpmsolver_pp: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    Sampler.dpmsingle: ("DPMSolverSinglestepScheduler", {}),
}


def sample_step_interval(config: Any) -> int:
    """Render samples every this many optimizer steps (0: never): sd-scripts' rule, under which
    `sample_every_n_steps` counts only when `sample_every_n_epochs` is not set. Both at once would render
    two or three rounds an epoch, one of them the epoch's own again."""
    return 0 if config.sample_every_n_epochs else config.sample_every_n_steps


def _scheduler(base: LoadedModel, sampler: Sampler):
    """`sampler`'s scheduler on the model's own training schedule (its betas and prediction type)."""
    import diffusers

    name, options = SCHEDULERS[Sampler(sampler)]
    return getattr(diffusers, name).from_config(base.noise_scheduler.config, **options)


def _pipeline(base: LoadedModel, sampler: Sampler):
    """The family's diffusers pipeline over the trainer's modules (shared, not copied), on the family's
    own scheduler where it has one (a flow model samples with its flow's), else the sampler's."""
    scheduler = base.family.render_scheduler(base)
    return base.family.pipeline(base, scheduler if scheduler is not None else _scheduler(base, sampler))


@contextmanager
def _eval_mode(base: LoadedModel) -> Iterator[None]:
    """Eval mode and no gradients while rendering; each module's mode restored after.

    The global RNG needs no saving: every render draws from its own seeded generator.
    """
    modules = [base.vae, *base.components.values()]
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


@contextmanager
def _tiled_vae(vae: Any, on: bool) -> Iterator[None]:
    """The VAE decoding in tiles and slices while `on` (less memory, the same picture but for tile seams);
    back as it was after, since training encodes with the same VAE."""
    if not on or not hasattr(vae, "enable_tiling"):
        yield
        return
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield
    finally:
        vae.disable_tiling()
        vae.disable_slicing()


def render(base: LoadedModel, spec: SampleSpec, precision: Precision, light: bool = False) -> list[list[Image.Image]]:
    """One image per prompt and seed, `[prompt][seed]`, one at a time: the same inputs give the same pictures.

    The text encoders and UNet run in the training precision (`precision.autocast()`),
    and the VAE decodes outside that autocast, in its own fp32 weights (bf16 when
    training in bf16): SDXL's VAE overflows in fp16 to black or NaN pictures.
    `light`: the VAE decodes tiled and sliced (a retry after running out of memory).
    """
    pipeline = _pipeline(base, spec.sampler)
    pipeline.set_progress_bar_config(disable=True)
    default_steps, default_scale = base.family.sample_defaults(base)
    grid = []
    with _eval_mode(base), _tiled_vae(base.vae, light):
        for prompt in spec.prompts:
            row = []
            for seed in prompt.seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                with precision.autocast():
                    latents = pipeline(
                        prompt.text,
                        width=prompt.width,
                        height=prompt.height,
                        num_inference_steps=prompt.steps or default_steps,
                        guidance_scale=default_scale if prompt.scale is None else prompt.scale,
                        generator=generator,
                        output_type="latent",
                        **base.family.render_kwargs(base, prompt.negative),
                    ).images
                with precision.vae_autocast():
                    image = base.family.decode(base, latents, prompt.height, prompt.width)
                row.append(pipeline.image_processor.postprocess(image.float(), output_type="pil")[0])
            grid.append(row)
    return grid


def sample_filename(
    output_name: str, index: int, seed: int, *, epoch: int | None = None, step: int | None = None
) -> str:
    """sd-scripts' file name: `<name>_e000001_00_<YYYYmmddHHMMSS>_<seed>.png` at an epoch's end,
    `<name>_000100_00_...` at a step."""
    return f"{output_name}_{_round(epoch, step)}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{seed}.png"


def _round(epoch: int | None, step: int | None) -> str:
    if (epoch is None) == (step is None):
        raise ValueError("give exactly one of epoch or step")
    return f"e{epoch:06d}" if epoch is not None else f"{step:06d}"


def sample_files(folder: Path, output_name: str, *, epoch: int | None = None, step: int | None = None) -> list[Path]:
    """The images already rendered for one round (an epoch's end, or a step), whatever second they carry."""
    name = re.compile(rf"{re.escape(output_name)}_{_round(epoch, step)}_\d{{2}}_\d{{14}}_-?\d+\.png")
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if name.fullmatch(p.name)) if folder.is_dir() else []


def save_samples(
    folder: Path,
    output_name: str,
    spec: SampleSpec,
    grid: list[list[Image.Image]],
    *,
    epoch: int | None = None,
    step: int | None = None,
) -> list[Path]:
    """Write each image atomically under `folder` (`result_current/sample/`); returns the paths.

    The round's earlier images go once the new ones are written: a run killed after rendering an epoch's
    samples renders them again, and the names carry the second, so the old set would stand beside the new.
    """
    earlier = sample_files(folder, output_name, epoch=epoch, step=step)
    paths = []
    for index, (prompt, row) in enumerate(zip(spec.prompts, grid, strict=True)):
        for seed, image in zip(prompt.seeds, row, strict=True):
            path = Path(folder) / sample_filename(output_name, index, seed, epoch=epoch, step=step)
            with atomic_output(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
    for path in set(earlier) - set(paths):
        path.unlink(missing_ok=True)
    return paths


def contact_sheet(grid: list[list[Image.Image]], spec: SampleSpec, title: str = "", cell: int = 192) -> Image.Image:
    """Prompts down, seeds across, each picture `cell` px, labelled: one image per round for the UI."""
    label = 18
    rows, cols = len(grid), max(len(row) for row in grid)
    sheet = Image.new("RGB", (cols * cell, label + rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"{title}  seeds {', '.join(map(str, spec.seeds))}", fill=(0, 0, 0))
    for r, (prompt, row) in enumerate(zip(spec.prompts, grid, strict=True)):
        top = label + r * (cell + label)
        draw.text((4, top + 3), prompt.text[: cols * cell // 7], fill=(40, 40, 40))
        for c, image in enumerate(row):
            thumb = image.convert("RGB")
            thumb.thumbnail((cell, cell))
            sheet.paste(thumb, (c * cell + (cell - thumb.width) // 2, top + label + (cell - thumb.height) // 2))
    return sheet
