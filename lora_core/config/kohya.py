"""Config files in kohya's and CivitAI's formats: the kohya_ss GUI LoRA JSON and CivitAI's training JSON.

`read_config_file` reads either into our field names, naming the file and the
field of any bad value; `lora_core.setup.resolve.load_config` lays it over the
family's preset. `to_kohya_gui` exports the kohya_ss JSON of a run, which reads
back unchanged. This is the one place kohya's `sdxl`/`v2` flags (and CivitAI's
1024 px resolution) are turned into a model family.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lora_core.config.lora_config import ConfigError, LoraConfig, format_optimizer_args
from lora_core.foundation.fs import atomic_write_text

__all__ = [
    "ConfigFile",
    "ConfigWarning",
    "describe_validation_error",
    "read_config_file",
    "to_kohya_gui",
    "write_kohya_gui",
]


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
    "sdxl",
    "v2",
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
    if _as_int(data.get("resolution"), 0) >= 1024:  # CivitAI's SDXL trainings are its 1024 px ones
        fields["model_family"], origin["model_family"] = "sdxl", "resolution"
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
    if "model_family" not in data and ("sdxl" in data or "v2" in data):
        sdxl = data.get("sdxl") in (True, "true", "True")
        fields["model_family"], origin["model_family"] = ("sdxl", "sdxl") if sdxl else ("sd15", "v2")
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


@dataclass
class ConfigFile:
    """A kohya_ss or CivitAI config file read into our field names, before any preset is laid under it."""

    path: Path
    fields: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # our field -> the file's key, for messages
    unknown: list[str] = field(default_factory=list)

    @property
    def model_family(self) -> str | None:
        return self.fields.get("model_family")

    def over(self, base: LoraConfig) -> LoraConfig:
        """The file's values laid over `base`; a bad value raises `ConfigError` naming the file and the key."""
        try:
            return LoraConfig.model_validate(base.model_dump() | self.fields)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(self.path, err, self.origin)) from None


def read_config_file(path: Path | str) -> ConfigFile:
    """Read a kohya_ss GUI LoRA JSON or a CivitAI training JSON (told apart by CivitAI's camelCase keys).

    Unknown keys warn with a `ConfigWarning` naming them; an unreadable file
    or a value that cannot be mapped raises `ConfigError` naming the file.
    """
    path = Path(path)
    data = _read_json(path)
    try:
        fields, origin, unknown = _from_civitai(data) if _is_civitai(data) else _from_kohya_gui(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if unknown:
        warnings.warn(
            ConfigWarning(f"{path}: ignoring keys this trainer does not use: {', '.join(sorted(unknown))}"),
            stacklevel=2,
        )
    return ConfigFile(path, fields, origin, unknown)


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
    """The kohya_ss GUI LoRA-tab JSON of a run; `read_config_file` reads it back unchanged."""
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
    out["sdxl"] = config.model_family == "sdxl"  # kohya_ss's checkbox; model_family is exported as itself too
    out["v2"] = False
    out["train_data_dir"] = str(train_data_dir)
    out["output_dir"] = str(output_dir)
    out["output_name"] = output_name
    out["save_model_as"] = "safetensors"
    return dict(sorted(out.items()))


def write_kohya_gui(path: Path, config: LoraConfig, **paths: Any) -> None:
    """Write `to_kohya_gui` atomically as indented JSON."""
    atomic_write_text(path, json.dumps(to_kohya_gui(config, **paths), indent=2) + "\n")
