"""Config files in kohya's and CivitAI's formats: the kohya_ss GUI LoRA JSON and CivitAI's training JSON.

`load_config` imports either on top of a preset, naming the file and the field
of any bad value; `to_kohya_gui` exports the kohya_ss JSON of a run, which
`load_config` reads back unchanged.
"""

from __future__ import annotations

import json
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lora_core.config.lora_config import ConfigError, LoraConfig, Preset, format_optimizer_args, preset_config
from lora_core.foundation.fs import atomic_write_text

__all__ = ["ConfigWarning", "describe_validation_error", "load_config", "to_kohya_gui", "write_kohya_gui"]


class ConfigWarning(UserWarning):
    """A config file with keys this trainer does not use."""


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


def describe_validation_error(path: Path, err: ValidationError, origin: dict[str, str]) -> str:
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
        raise ConfigError(describe_validation_error(path, err, origin)) from None


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
