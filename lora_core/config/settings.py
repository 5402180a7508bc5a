"""The stage settings: photo acceptance, dataset checks, captioning and checkpoint selection.

Each is one block of `LoraConfig` (`ingest`, `checks`, `captioning`,
`selection`) with the recipe's advice as defaults, so a stage can be given its own
block alone. The words the blocks and stages share (what the subject is, what to
do with a flagged photo) are defined here too.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.checks import (
    FaceSettings,
    ImageSettings,
    MirrorPolicy,
    OrientationSettings,
    QualityPolicy,
    VarietySettings,
)

__all__ = [
    "DEFAULT_CAPTION_MODEL",
    "DEFAULT_CLASS_PROMPTS",
    "DEFAULT_METRIC_PROMPTS",
    "DEFAULT_STRIP_PHRASES",
    "CaptionSettings",
    "CheckSettings",
    "IngestSettings",
    "MirrorPolicy",
    "QualityPolicy",
    "SelectionSettings",
    "SubjectType",
]


class IngestSettings(BaseModel):
    """Rules for accepting a photo into the training set (the recipe's dataset advice)."""

    model_config = ConfigDict(extra="forbid")

    min_short_side: int = Field(
        256,
        ge=64,
        description="Reject images whose short side is below this (the recipe's 256 px floor; never upscaled).",
    )
    max_long_side: int = Field(
        2048, ge=256, description="Downscale images whose long side exceeds this (the recipe's 2048 px ceiling)."
    )
    min_images: int = Field(
        5, ge=1, description="Refuse to go on with fewer accepted images (the recipe: 5 to 10 can work)."
    )
    warn_above_images: int = Field(
        100, ge=1, description="Warn above this many accepted images (the recipe: more than 100 is a waste of work)."
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
    """The dataset checks the recipe's author does by eye, with their thresholds.

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
    """Epoch metrics, the decision's thresholds and auto-resume (see `lora_core.evaluation.selection`)."""

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
        0.95,
        gt=0,
        le=1,
        description="Before a guard, choose the earliest epoch within this share of the best fidelity; by the "
        "held-out loss, the latest from its minimum within this share of it.",
    )
    rising: float = Field(
        0.02,
        description="Best at the last epoch and still improving by more than this share (fidelity or held-out "
        "loss): undertrained.",
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
    max_resumes: int = Field(
        2, ge=0, description="Undertrained: continue from the last epoch at most this often (needs_review: never)."
    )
    resume_epochs: int = Field(2, ge=1, le=10, description="Epochs each resume trains (the recipe: 2 or 3 more).")
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

# Things BLIP says that are rarely true of a portrait (the recipe: it "LOVES adding
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
    """BLIP captioning, with the recipe's kohya_ss settings as defaults (names from kohya's BLIP tool)."""

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
    num_beams: int = Field(9, ge=1, le=64, description="Beams (the recipe: 9).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus-sampling probability, when beam_search is off.")
    min_length: int = Field(15, ge=0, description="Shortest caption in tokens (the recipe: 15).")
    max_length: int = Field(75, ge=1, le=512, description="Longest caption in tokens.")
    batch_size: int = Field(4, ge=1, description="Images per BLIP batch (the recipe: 4).")
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
