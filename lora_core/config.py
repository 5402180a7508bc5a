"""One training configuration, with the seed's recipe as defaults.

Field names follow kohya_ss (GUI LoRA tab / sd-scripts) wherever kohya has a
name, so a user moving from kohya recognises every setting. The model is
validated at the edge: `load_config` imports a kohya_ss GUI LoRA JSON or a
CivitAI training JSON, `to_kohya_gui` exports the kohya_ss JSON of a run.
"""

from __future__ import annotations

import ast
import json
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_core.checks import (
    FaceSettings,
    ImageSettings,
    MirrorPolicy,
    OrientationSettings,
    QualityPolicy,
    VarietySettings,
)
from lora_core.fs import atomic_write_text

__all__ = [
    "DEFAULT_CAPTION_MODEL",
    "DEFAULT_STRIP_PHRASES",
    "CaptionSettings",
    "CheckSettings",
    "ConfigError",
    "ConfigWarning",
    "IngestSettings",
    "LRScheduler",
    "LoraConfig",
    "MirrorPolicy",
    "MixedPrecision",
    "Optimizer",
    "Preset",
    "QualityPolicy",
    "Sampler",
    "SelectionSettings",
    "SubjectType",
    "format_optimizer_args",
    "load_config",
    "parse_optimizer_args",
    "preset_config",
    "to_kohya_gui",
    "write_kohya_gui",
]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class ConfigWarning(UserWarning):
    """A config file with keys this trainer does not use."""


class Preset(StrEnum):
    sd15 = "sd15"
    sdxl = "sdxl"


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


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse kohya's `optimizer_args` string, e.g. ``"weight_decay=0.1 betas=0.9,0.99"``.

    Values are Python literals (numbers, booleans, tuples); anything else stays a string.
    """
    args: dict[str, Any] = {}
    for item in text.replace("\n", " ").split():
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"expected key=value pairs separated by spaces, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
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


class IngestSettings(BaseModel):
    """Rules for accepting a photo into the training set (the seed's dataset advice)."""

    model_config = ConfigDict(extra="forbid")

    min_short_side: int = Field(
        256,
        ge=64,
        description="Reject images whose short side is below this (the seed's 256 px floor; never upscaled).",
    )
    max_long_side: int = Field(
        2048, ge=256, description="Downscale images whose long side exceeds this (the seed's 2048 px ceiling)."
    )
    min_images: int = Field(
        5, ge=1, description="Refuse to go on with fewer accepted images (the seed: 5 to 10 can work)."
    )
    warn_above_images: int = Field(
        100, ge=1, description="Warn above this many accepted images (the seed: more than 100 is a waste of work)."
    )
    near_duplicate_distance: int = Field(
        6,
        ge=0,
        le=64,
        description="Largest perceptual-hash distance (of 64 bits) at which two photos are the same photo.",
    )
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Decompression-bomb guard: refuse images whose header declares more pixels than this.",
    )
    max_file_bytes: int = Field(200 * 2**20, ge=1, description="Refuse input files larger than this many bytes.")


class SubjectType(StrEnum):
    """What the LoRA learns; the face-based checks apply only to a person."""

    person = "person"
    object = "object"
    style = "style"


class CheckSettings(VarietySettings, ImageSettings, FaceSettings, OrientationSettings):
    """The dataset checks the seed's author does by eye, with their thresholds.

    Each check's thresholds are declared beside it, in `lora_core.checks`;
    this model gathers them under one flat `checks` section. Image measures
    (blur) are judged relative to the rest of the set, so a soft but
    consistent set is not flagged wholesale.
    """

    model_config = ConfigDict(extra="forbid")

    quality_policy: QualityPolicy = Field(
        QualityPolicy.flag, description="Photos a quality check flags: flag (report, keep) or reject."
    )


# The metric grid: a neutral portrait, then prompts that move the subject somewhere new
# (recontextualisation and style, as DreamBooth evaluates), all with the token.
DEFAULT_METRIC_PROMPTS: tuple[str, ...] = (
    "{token}, portrait photo",
    "{token}, photo sitting in a cafe, window light",
    "{token}, oil painting portrait",
    "{token}, pencil sketch",
    "{token} wearing a space suit, photo",
)

# The class prompt without the token, per subject type: what the LoRA must leave alone.
DEFAULT_CLASS_PROMPTS = {"person": "portrait photo of a person", "object": "photo of an object", "style": "a painting"}


class SelectionSettings(BaseModel):
    """Epoch metrics, the decision's thresholds and auto-resume (see `lora_core.selection`)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_METRIC_PROMPTS),
        min_length=1,
        description="Metric-grid prompts with {token}; the first is the neutral portrait. kohya's options allowed.",
    )
    class_prompt: str | None = Field(
        None, description="The class prompt without the token (default by subject_type: 'portrait photo of a person')."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [1, 2, 3], min_length=2, description="Seeds of every grid prompt (diversity needs 2+)."
    )
    size: int | None = Field(None, ge=64, description="Grid image side in pixels (default: the training resolution).")
    steps: int = Field(20, ge=1, description="Sampling steps of the grid (Euler ancestral, as the samples).")
    fidelity_band: float = Field(
        0.95, gt=0, le=1, description="Choose the earliest epoch within this share of the best one's signal."
    )
    rising: float = Field(
        0.02, description="Best at the last epoch and still improving by more than this share: undertrained."
    )
    min_fidelity: float = Field(
        0.0, ge=0, description="Best fidelity under this share of the photos' own similarity: undertrained."
    )
    copy_distance: int = Field(6, ge=-1, description="COPY: a sample this close (perceptual hash) to a photo.")
    min_diversity: float = Field(0.5, ge=0, description="DIV: variety across seeds under this share of the base's.")
    max_preservation: float = Field(
        0.1, description="PRES: class-prompt samples this much closer to the subject than the base model's."
    )
    max_burn: float = Field(
        0.25, description="BURN: this much more saturated, clipped, smooth or blocky than the base."
    )
    max_resumes: int = Field(2, ge=0, description="Undertrained: continue from the last epoch at most this often.")
    resume_epochs: int = Field(2, ge=1, le=10, description="Epochs each resume trains (the seed: 2 or 3 more).")
    strengths: list[float] = Field(
        default_factory=lambda: [0.6, 0.8, 1.0],
        min_length=1,
        description="LoRA strengths rendered into txt2img-images/ with the chosen epoch.",
    )

    @field_validator("prompts")
    @classmethod
    def _prompts_have_the_token(cls, value: list[str]) -> list[str]:
        if not all("{token}" in prompt for prompt in value):
            raise ValueError("every metric prompt needs {token}; the class prompt is set apart (class_prompt)")
        return value


DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"

# Things BLIP says that are rarely true of a portrait (the seed: it "LOVES adding
# phrases like 'holding a remote control'"), and the nonsense words blip-large is
# known for ("arafed man in a suit"). Matched as whole words, any case.
DEFAULT_STRIP_PHRASES: tuple[str, ...] = (
    "holding a remote control",
    "with a remote control",
    "holding a remote",
    "with a microphone in his hand",
    "with a microphone in her hand",
    "with a microphone in the hand",
    "with a microphone in hand",
    "holding a microphone",
    "arafed",
    "araffed",
    "araffe",
    "arafe",
)


class CaptionSettings(BaseModel):
    """BLIP captioning, with the seed's kohya_ss settings as defaults (names from kohya's BLIP tool)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        DEFAULT_CAPTION_MODEL,
        min_length=1,
        description="BLIP captioning model: hub id, local folder, or builtin:tiny-blip (offline, for tests).",
    )
    prefix: str = Field("{token}, ", description="Put before every caption; {token} is the trigger token.")
    postfix: str = Field("", description="Put after every BLIP caption.")
    prompt: str = Field(
        "a picture of ",
        description="Text BLIP continues, removed from the caption (kohya's BLIP does the same).",
    )
    beam_search: bool = Field(True, description="Beam search; off means nucleus sampling with top_p.")
    num_beams: int = Field(9, ge=1, le=64, description="Beams (the seed: 9).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus-sampling probability, when beam_search is off.")
    min_length: int = Field(15, ge=0, description="Shortest caption in tokens (the seed: 15).")
    max_length: int = Field(75, ge=1, le=512, description="Longest caption in tokens.")
    batch_size: int = Field(4, ge=1, description="Images per BLIP batch (the seed: 4).")
    strip_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STRIP_PHRASES),
        description="Phrases removed from BLIP captions (whole words, any case); each removal is reported.",
    )
    recaption: bool = Field(False, description="Caption with BLIP even where a caption came with the photo.")

    @field_validator("prefix", "postfix")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(token="t")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"only {{token}} may appear in braces ({err})") from None
        return value

    @model_validator(mode="after")
    def _lengths(self) -> CaptionSettings:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is above max_length {self.max_length}")
        return self


class LoraConfig(BaseModel):
    """Every training setting of the seed's recipe; defaults are its SD1.5 values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Base model
    pretrained_model_name_or_path: str | None = Field(
        None, description="Base model: hub id, local diffusers folder or single-file checkpoint."
    )
    sdxl: bool = Field(False, description="The base model is SDXL.")
    v2: bool = Field(False, description="The base model is SD 2.x.")
    v_parameterization: bool = Field(False, description="The base model predicts v rather than noise.")

    # Network
    network_dim: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    network_alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / dim.")
    network_weights: str | None = Field(
        None,
        description="Existing LoRA to continue training from (kohya_ss GUI: lora_network_weights), "
        "the seed's way to resume an undertrained run.",
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
        None, ge=1, description="Repeats per image; unset means 400 / number of images, as the seed does."
    )
    enable_bucket: bool = Field(True, description="Aspect-ratio buckets instead of square crops.")
    min_bucket_reso: int = Field(256, ge=64, description="Smallest bucket side.")
    max_bucket_reso: int = Field(1024, ge=64, description="Largest bucket side.")
    bucket_reso_steps: int = Field(64, ge=8, description="Bucket sides are multiples of this.")
    bucket_no_upscale: bool = Field(
        True, description="Never upscale an image to fill a bucket (the seed: don't upscale)."
    )
    flip_aug: bool = Field(False, description="Random horizontal flips; off, since faces are not symmetric.")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated caption tags.")
    keep_tokens: int = Field(0, ge=0, description="Leading caption tags kept in place when shuffling.")
    caption_extension: str = Field(
        ".txt", pattern=r"^\.[A-Za-z0-9_.-]+$", description="Extension of caption files beside the images."
    )
    max_token_length: int = Field(75, description="Caption token limit: 75, 150 or 225.")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the output of the n-th last text-encoder layer.")

    # Schedule and hardware
    train_batch_size: int = Field(2, ge=1, description="Images per step.")
    max_train_epochs: int = Field(6, ge=1, description="Epochs to train (the seed: 6 to start).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    mixed_precision: MixedPrecision = Field(MixedPrecision.fp16, description="Mixed precision of training.")
    save_precision: MixedPrecision = Field(MixedPrecision.fp16, description="Precision of the saved LoRA.")
    cache_latents: bool = Field(True, description="Encode each image once.")
    cache_latents_to_disk: bool = Field(
        False, description="Keep cached latents on disk (less VRAM; the seed's OOM fix)."
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

    training_comment: str = Field("", description="Note stored in the LoRA's ss_training_comment (kohya_ss GUI).")

    subject_type: SubjectType = Field(
        SubjectType.person, description="person, object or style; face-based checks apply to a person only."
    )
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Photo acceptance rules.")
    checks: CheckSettings = Field(default_factory=CheckSettings, description="Orientation, mirroring and quality.")
    captioning: CaptionSettings = Field(default_factory=CaptionSettings, description="BLIP captioning.")
    selection: SelectionSettings = Field(
        default_factory=SelectionSettings, description="Epoch metrics, checkpoint selection and auto-resume."
    )

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
    def _buckets_contain_resolution(self) -> LoraConfig:
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ValueError(
                f"resolution {self.resolution} must lie between min_bucket_reso "
                f"{self.min_bucket_reso} and max_bucket_reso {self.max_bucket_reso}"
            )
        return self


_PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.sd15: {},
    # The seed's SDXL recipe (same LRs and network, 1024 px, buckets up to 2048, bf16) within the seed's
    # 10 GB, as sd-scripts' 12 GB recipe does it: gradient checkpointing and the UNet only, so the text
    # encoders' outputs are cached once and the encoders leave the GPU.
    Preset.sdxl: {
        "sdxl": True,
        "resolution": 1024,
        "max_bucket_reso": 2048,
        "mixed_precision": MixedPrecision.bf16,
        "save_precision": MixedPrecision.bf16,
        "gradient_checkpointing": True,
        "train_text_encoder": False,
    },
}


def preset_config(preset: Preset | str = Preset.sd15) -> LoraConfig:
    """The seed's recipe for SD1.5 (`sd15`) or SDXL (`sdxl`)."""
    try:
        preset = Preset(preset)
    except ValueError:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: sd15, sdxl") from None
    return LoraConfig(**_PRESETS[preset])


# --- Import ---------------------------------------------------------------

# CivitAI training JSON key -> our field.
_CIVITAI_KEYS: dict[str, str] = {
    "unetLR": "unet_lr",
    "textEncoderLR": "text_encoder_lr",
    "networkDim": "network_dim",
    "networkAlpha": "network_alpha",
    "numRepeats": "num_repeats",
    "resolution": "resolution",
    "lrScheduler": "lr_scheduler",
    "lrSchedulerNumCycles": "lr_scheduler_num_cycles",
    "minSnrGamma": "min_snr_gamma",
    "optimizerType": "optimizer",
    "optimizerArgs": "optimizer_args",
    "trainBatchSize": "train_batch_size",
    "maxTrainEpochs": "max_train_epochs",
    "enableBucket": "enable_bucket",
    "flipAugmentation": "flip_aug",
    "shuffleCaption": "shuffle_caption",
    "keepTokens": "keep_tokens",
    "clipSkip": "clip_skip",
    "noiseOffset": "noise_offset",
}
# CivitAI keys that are derived from the others and need no field.
_CIVITAI_DERIVED = {"targetSteps", "loraType"}

# kohya_ss GUI keys whose name differs from ours, or that carry a run's paths.
_KOHYA_RENAMED = {
    "epoch",
    "max_resolution",
    "learning_rate",
    "network_train_unet_only",
    "LoRA_type",
    "lora_network_weights",
}
_KOHYA_RUN_PATHS = {
    "train_data_dir",
    "output_dir",
    "output_name",
    "logging_dir",
    "reg_data_dir",
    "model_list",
    "save_model_as",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _is_civitai(data: dict[str, Any]) -> bool:
    return any(key in data for key in _CIVITAI_KEYS if key != "resolution")


def _from_civitai(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in _CIVITAI_KEYS:
            fields[_CIVITAI_KEYS[key]] = value
            origin[_CIVITAI_KEYS[key]] = key
        elif key not in _CIVITAI_DERIVED:
            unknown.append(key)
    if "textEncoderLR" in data and "train_text_encoder" not in fields:  # CivitAI trains the encoders at LR > 0
        fields["train_text_encoder"] = _as_float(data["textEncoderLR"], 0.0) > 0
        origin["train_text_encoder"] = "textEncoderLR"
    lora_type = data.get("loraType", "lora")
    if str(lora_type).lower() != "lora":
        raise ConfigError(f"field 'loraType': {lora_type!r} is not supported; only 'lora'")
    return fields, origin, unknown


def _from_kohya_gui(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    # The GUI writes "" for unset values: those take our defaults.
    data = {key: value for key, value in data.items() if value != "" and value is not None}
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in LoraConfig.model_fields:
            fields[key] = value
            origin[key] = key
        elif key not in _KOHYA_RENAMED | _KOHYA_RUN_PATHS:
            unknown.append(key)

    if "epoch" in data and "max_train_epochs" not in data:
        fields["max_train_epochs"], origin["max_train_epochs"] = data["epoch"], "epoch"
    if "learning_rate" in data and not data.get("unet_lr"):
        fields["unet_lr"], origin["unet_lr"] = data["learning_rate"], "learning_rate"
    if "network_train_unet_only" in data and "train_text_encoder" not in data:
        fields["train_text_encoder"] = not data["network_train_unet_only"]
        origin["train_text_encoder"] = "network_train_unet_only"
    if "lora_network_weights" in data and "network_weights" not in data:
        fields["network_weights"], origin["network_weights"] = data["lora_network_weights"], "lora_network_weights"
    if "max_resolution" in data:
        sides = [s.strip() for s in str(data["max_resolution"]).split(",")]
        if len(sides) == 2 and sides[0] != sides[1]:
            raise ConfigError(f"field 'max_resolution': {data['max_resolution']!r} is not square; use 'N,N'")
        fields["resolution"], origin["resolution"] = sides[0], "max_resolution"
    lora_type = data.get("LoRA_type", "Standard")
    if lora_type != "Standard":
        raise ConfigError(f"field 'LoRA_type': {lora_type!r} is not supported; only 'Standard' LoRA")
    return fields, origin, unknown


def _describe(path: Path, err: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        field = ".".join(loc) or "(config)"
        name = origin.get(loc[0], field) if loc else field
        shown = f"'{name}'" if name == field else f"'{name}' ({field})"
        got = f" (got {item['input']!r})" if loc and not isinstance(item.get("input"), dict) else ""
        lines.append(f"{path}: field {shown}: {item['msg']}{got}")
    return "\n".join(lines)


def load_config(path: Path | str, preset: Preset | str | None = None) -> LoraConfig:
    """Load a kohya_ss GUI LoRA JSON or a CivitAI training JSON on top of a preset.

    The format is detected from the keys (CivitAI's are camelCase). Without an
    explicit `preset`, an SDXL file (kohya's ``"sdxl": true``, or CivitAI's
    resolution of 1024 or more) starts from the `sdxl` preset. Unknown keys warn
    with a `ConfigWarning` naming them; a bad value raises `ConfigError` naming
    the file and the field.
    """
    path = Path(path)
    data = _read_json(path)
    try:
        if _is_civitai(data):
            fields, origin, unknown = _from_civitai(data)
            looks_sdxl = _as_int(fields.get("resolution"), 0) >= 1024
        else:
            fields, origin, unknown = _from_kohya_gui(data)
            looks_sdxl = fields.get("sdxl") in (True, "true", "True")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if unknown:
        warnings.warn(
            ConfigWarning(f"{path}: ignoring keys this trainer does not use: {', '.join(sorted(unknown))}"),
            stacklevel=2,
        )
    base = preset_config(preset or (Preset.sdxl if looks_sdxl else Preset.sd15))
    merged = base.model_dump() | fields
    try:
        return LoraConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(path, err, origin)) from None


def _as_float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# --- Export ---------------------------------------------------------------


def to_kohya_gui(
    config: LoraConfig,
    *,
    train_data_dir: Path | str = "",
    output_dir: Path | str = "",
    output_name: str = "",
) -> dict[str, Any]:
    """The kohya_ss GUI LoRA-tab JSON of a run; `load_config` reads it back unchanged."""
    out: dict[str, Any] = {"LoRA_type": "Standard"}
    for name in LoraConfig.model_fields:
        value = getattr(config, name)
        if isinstance(value, StrEnum):
            value = value.value
        elif isinstance(value, BaseModel):
            value = value.model_dump()
        out[name] = value
    out["optimizer_args"] = format_optimizer_args(config.optimizer_args)
    out["pretrained_model_name_or_path"] = config.pretrained_model_name_or_path or ""
    out["network_weights"] = out["lora_network_weights"] = config.network_weights or ""
    out["epoch"] = config.max_train_epochs
    out["learning_rate"] = config.unet_lr
    out["max_resolution"] = f"{config.resolution},{config.resolution}"
    out["network_train_unet_only"] = not config.train_text_encoder
    out["train_data_dir"] = str(train_data_dir)
    out["output_dir"] = str(output_dir)
    out["output_name"] = output_name
    out["save_model_as"] = "safetensors"
    return dict(sorted(out.items()))


def write_kohya_gui(path: Path, config: LoraConfig, **paths: Any) -> None:
    """Write `to_kohya_gui` atomically as indented JSON."""
    atomic_write_text(path, json.dumps(to_kohya_gui(config, **paths), indent=2) + "\n")
