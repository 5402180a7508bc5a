"""One training configuration, with the recipe's settings as defaults.

Field names follow kohya_ss (GUI LoRA tab / sd-scripts) wherever kohya has a
name, so a user moving from kohya recognises every setting. The model is
validated at the edge. Each stage's own block of settings is in
`lora_core.config.settings`; `lora_core.config.kohya` imports a kohya_ss GUI LoRA JSON or
a CivitAI training JSON and exports the kohya_ss JSON of a run.
"""

from __future__ import annotations

import ast
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.config.settings import CaptionSettings, CheckSettings, IngestSettings, SelectionSettings, SubjectType
from lora_core.foundation.errors import UserError

__all__ = [
    "ConfigError",
    "LRScheduler",
    "LoraConfig",
    "MixedPrecision",
    "Optimizer",
    "Sampler",
    "format_optimizer_args",
    "parse_optimizer_args",
]


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class MixedPrecision(StrEnum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Optimizer(StrEnum):
    AdamW8bit = "AdamW8bit"
    AdamW = "AdamW"
    Adafactor = "Adafactor"


class LRScheduler(StrEnum):
    """The schedulers diffusers' `get_scheduler` provides under these names."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Sampler(StrEnum):
    """sd-scripts' `sample_sampler` names (the `k_` ones are aliases of the same schedulers)."""

    ddim = "ddim"
    pndm = "pndm"
    lms = "lms"
    euler = "euler"
    euler_a = "euler_a"
    heun = "heun"
    dpm_2 = "dpm_2"
    dpm_2_a = "dpm_2_a"
    dpmsolver = "dpmsolver"
    dpmsolver_pp = "dpmsolver++"
    dpmsingle = "dpmsingle"
    k_lms = "k_lms"
    k_euler = "k_euler"
    k_euler_a = "k_euler_a"
    k_dpm_2 = "k_dpm_2"
    k_dpm_2_a = "k_dpm_2_a"


# Where the next key=value pair starts: after spaces (kohya) or ", " (CivitAI's Flux args, whose tuples have
# spaces inside parentheses: "weight_decay=0.01, betas=(0.9, 0.999)").
_NEXT_ARG = re.compile(r"[\s,]+(?=[A-Za-z_]\w*=)")


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse kohya's `optimizer_args` string, e.g. ``"weight_decay=0.1 betas=0.9,0.99"``.

    Pairs are separated by spaces or commas; values are Python literals (numbers, booleans,
    tuples); anything else without spaces stays a string.
    """
    args: dict[str, Any] = {}
    for item in _NEXT_ARG.split(text.strip().strip(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        raw = raw.strip().rstrip(",").strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"expected key=value pairs separated by spaces, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if raw.split() != [raw]:  # "0.1 betas" is a missing '=', not a string value
                raise ValueError(f"expected key=value pairs separated by spaces, got {item!r}") from None
            value = raw
        args[key] = value
    return args


def format_optimizer_args(args: dict[str, Any]) -> str:
    """Inverse of `parse_optimizer_args`."""

    def fmt(value: Any) -> str:
        if isinstance(value, (tuple, list)):
            return ",".join(repr(v) for v in value)
        return repr(value) if not isinstance(value, str) else value

    return " ".join(f"{key}={fmt(value)}" for key, value in args.items())


class LoraConfig(BaseModel):
    """Every training setting of the recipe; defaults are its SD1.5 values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Base model
    pretrained_model_name_or_path: str | None = Field(
        None, description="Base model: hub id, local diffusers folder or single-file checkpoint."
    )
    model_family: str = Field(
        "sd15",
        description="The base model's family (a name in lora_core.families.FAMILIES: sd15 for SD1.x/2.x, sdxl, "
        "flux for FLUX.1); kohya_ss's sdxl, v2 and flux1_checkbox flags map to it on import.",
    )
    v_parameterization: bool = Field(False, description="The base model predicts v rather than noise.")

    # Network
    network_dim: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    network_alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / dim.")
    network_weights: str | None = Field(
        None,
        description="Existing LoRA to continue training from (kohya_ss GUI: lora_network_weights), "
        "the recipe's way to resume an undertrained run.",
    )
    train_text_encoder: bool = Field(
        True, description="Train LoRA on the text encoder(s) too (kohya: not network_train_unet_only)."
    )

    # Optimisation
    unet_lr: float = Field(4e-4, gt=0, description="Learning rate of the UNet LoRA.")
    text_encoder_lr: float = Field(4e-5, ge=0, description="Learning rate of the text-encoder LoRA.")
    optimizer: Optimizer = Field(Optimizer.AdamW8bit, description="Optimizer (AdamW8bit needs bitsandbytes).")
    optimizer_args: dict[str, Any] = Field(
        default_factory=lambda: {"weight_decay": 0.1},
        description="Extra optimizer keyword arguments, kohya's 'key=value' string.",
    )
    lr_scheduler: LRScheduler = Field(LRScheduler.cosine_with_restarts, description="Learning-rate schedule.")
    lr_scheduler_num_cycles: int = Field(3, ge=1, description="Restarts of cosine_with_restarts.")
    lr_warmup: float = Field(0, ge=0, le=100, description="Warm-up, in percent of all steps (kohya_ss GUI).")
    min_snr_gamma: float = Field(5, ge=0, description="Min-SNR loss weighting gamma; 0 turns it off.")
    noise_offset: float = Field(0, ge=0, le=1, description="Noise offset; 0 turns it off.")
    seed: int = Field(42, ge=0, description="Random seed, so a run repeats on the same hardware.")

    # Data
    resolution: int = Field(
        512,
        ge=256,
        le=2048,
        multiple_of=64,
        description="Training resolution (square side); 512 for SD1.5, 1024 for SDXL.",
    )
    num_repeats: int | None = Field(
        None, ge=1, description="Repeats per image; unset means 400 / number of images, as the recipe does."
    )
    enable_bucket: bool = Field(True, description="Aspect-ratio buckets instead of square crops.")
    min_bucket_reso: int = Field(256, ge=64, description="Smallest bucket side.")
    max_bucket_reso: int = Field(1024, ge=64, description="Largest bucket side.")
    bucket_reso_steps: int = Field(64, ge=8, description="Bucket sides are multiples of this.")
    bucket_no_upscale: bool = Field(
        True, description="Never upscale an image to fill a bucket (the recipe: don't upscale)."
    )
    flip_aug: bool = Field(False, description="Random horizontal flips; off, since faces are not symmetric.")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated caption tags.")
    keep_tokens: int = Field(0, ge=0, description="Leading caption tags kept in place when shuffling.")
    caption_extension: str = Field(
        ".txt", pattern=r"^\.[A-Za-z0-9_.-]+$", description="Extension of caption files beside the images."
    )
    max_token_length: int = Field(75, description="Caption token limit: 75, 150 or 225.")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the output of the n-th last text-encoder layer.")
    validation_split: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the images held out, never trained on, whose loss shows over- and undertraining "
        "where the subject embedding cannot (sd-scripts' name); 0: none held out.",
    )
    validation_seed: int | None = Field(
        None, ge=0, description="Seed of which images are held out (sd-scripts' name); unset: the training seed."
    )

    # Schedule and hardware
    train_batch_size: int = Field(2, ge=1, description="Images per step.")
    max_train_epochs: int = Field(6, ge=1, description="Epochs to train (the recipe: 6 to start).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    mixed_precision: MixedPrecision = Field(MixedPrecision.fp16, description="Mixed precision of training.")
    save_precision: MixedPrecision = Field(MixedPrecision.fp16, description="Precision of the saved LoRA.")
    cache_latents: bool = Field(True, description="Encode each image once.")
    cache_latents_to_disk: bool = Field(
        False, description="Keep cached latents on disk (less VRAM; the recipe's OOM fix)."
    )
    save_every_n_epochs: int = Field(1, ge=1, description="Write a LoRA every n epochs.")

    # Samples
    sample_every_n_steps: int = Field(100, ge=0, description="Render sample images every n steps (0: never).")
    sample_every_n_epochs: int = Field(
        1, ge=0, description="Render sample images at the end of every n-th epoch (0: never)."
    )
    sample_prompts: str = Field(
        "{token}, portrait photo",
        description="Sample prompt(s), one per line; {token} is replaced by the trigger token. kohya's options "
        "set a prompt's negative prompt, size, steps, CFG scale and seed: --n, --w, --h, --s, --l, --d.",
    )
    sample_sampler: Sampler = Field(
        Sampler.euler_a, description="Sampler of the sample images and metric grids (sd-scripts' names)."
    )

    # FLUX.1: sd-scripts' flux_train_network.py names (kohya_ss's GUI JSON uses them too); the SD families
    # ignore them. Defaults: sd-scripts' recommended FLUX.1-dev LoRA settings (docs/flux_train_network.md),
    # else its defaults.
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = Field(
        "shift",
        description="FLUX.1: how timesteps are drawn; shift (a shifted sigmoid) as sd-scripts recommends and "
        "fluxgym uses (sd-scripts' default: sigma).",
    )
    sigmoid_scale: float = Field(
        1.0, gt=0, description="FLUX.1: scale of the normal draw under sigmoid, shift and flux_shift sampling."
    )
    discrete_flow_shift: float = Field(
        3.1582,
        gt=0,
        description="FLUX.1: the shift of shift sampling; 3.1582 = e^1.15, FLUX.1-dev's own shift at 1024 px "
        "(sd-scripts' recommendation, fluxgym's value; sd-scripts' default: 3.0).",
    )
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = Field(
        "raw",
        description="FLUX.1: how the prediction becomes the loss target; raw as sd-scripts recommends "
        "(its default: sigma_scaled).",
    )
    guidance_scale: float = Field(
        1.0,
        ge=0,
        description="FLUX.1: the guidance embedding's value while training; 1.0 for the guidance-distilled dev "
        "(sd-scripts' default: 3.5).",
    )
    t5xxl_max_token_length: int | None = Field(
        None, ge=1, le=512, description="FLUX.1: T5-XXL caption token limit; unset: 512 for dev, 256 for schnell."
    )
    apply_t5_attn_mask: bool = Field(
        False, description="FLUX.1: mask T5-XXL padding in the encoder and double blocks; off, as few tools infer so."
    )
    fp8_base: bool = Field(
        False, description="FLUX.1: store the frozen base weights as float8, computed in the mixed precision."
    )
    nf4_base: bool = Field(
        False,
        description="FLUX.1: store the frozen base weights as 4-bit NF4 (bitsandbytes); ours, sd-scripts has none.",
    )
    clip_l: str | None = Field(
        None, description="FLUX.1: the CLIP-L text encoder's single file, for a base that is the transformer alone."
    )
    t5xxl: str | None = Field(
        None, description="FLUX.1: the T5-XXL text encoder's single file, for a base that is the transformer alone."
    )
    ae: str | None = Field(
        None, description="FLUX.1: the autoencoder's single file (ae.safetensors), for a transformer-only base."
    )

    @property
    def component_files(self) -> dict[str, str]:
        """The base model's components given as files of their own (sd-scripts' `clip_l`, `t5xxl`, `ae`)."""
        return {name: path for name in ("clip_l", "t5xxl", "ae") if (path := getattr(self, name))}

    training_comment: str = Field("", description="Note stored in the LoRA's ss_training_comment (kohya_ss GUI).")
    logging_dir: str | None = Field(
        None,
        description="TensorBoard logs of the loss and learning rate per step (kohya's name); "
        "a relative folder is inside the subject's folder. Unset: none.",
    )

    subject_type: SubjectType = Field(
        SubjectType.person, description="person, object or style; face-based checks apply to a person only."
    )
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Photo acceptance rules.")
    checks: CheckSettings = Field(default_factory=CheckSettings, description="Orientation, mirroring and quality.")
    captioning: CaptionSettings = Field(default_factory=CaptionSettings, description="BLIP captioning.")
    selection: SelectionSettings = Field(
        default_factory=SelectionSettings, description="Epoch metrics, checkpoint selection and auto-resume."
    )

    @property
    def split_seed(self) -> int:
        """The seed of which images are held out: `validation_seed`, else the training seed (sd-scripts' rule)."""
        return self.seed if self.validation_seed is None else self.validation_seed

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_any_case(cls, value: Any) -> Any:
        # CivitAI writes "AdamW8Bit", kohya "AdamW8bit": match regardless of case.
        if isinstance(value, str):
            for member in Optimizer:
                if member.value.lower() == value.strip().lower():
                    return member
        return value

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _parse_optimizer_args(cls, value: Any) -> Any:
        if value is None:
            return {}
        return parse_optimizer_args(value) if isinstance(value, str) else value

    @field_validator("caption_extension")
    @classmethod
    def _caption_not_an_image(cls, value: str) -> str:
        taken = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".safetensors", ".npz", ".json")
        if value.lower() in taken:
            raise ValueError(f"{value} is an image or data file extension; captions use .txt or .caption")
        return value

    @field_validator("max_token_length")
    @classmethod
    def _token_length(cls, value: int) -> int:
        if value not in (75, 150, 225):
            raise ValueError("must be 75, 150 or 225")
        return value

    @model_validator(mode="after")
    def _one_base_quantisation(self) -> LoraConfig:
        if self.fp8_base and self.nf4_base:
            raise ValueError("fp8_base and nf4_base are both set; the base weights are stored one way: choose one")
        return self

    @model_validator(mode="after")
    def _buckets_contain_resolution(self) -> LoraConfig:
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ValueError(
                f"resolution {self.resolution} must lie between min_bucket_reso "
                f"{self.min_bucket_reso} and max_bucket_reso {self.max_bucket_reso}"
            )
        return self
