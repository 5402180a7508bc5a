"""Config files in kohya's and CivitAI's formats: the kohya_ss GUI LoRA JSON and CivitAI's training JSON.

`read_config_file` reads either into our field names, naming the file and the
field of any bad value; `lora_core.setup.resolve.load_config` lays it over the
family's preset. `to_kohya_gui` exports the kohya_ss JSON of a run, which reads
back unchanged. This is the one place kohya's `sdxl`/`v2`/`flux1_checkbox` flags
(and CivitAI's base model, engine or 1024 px resolution) are turned into a model
family.

The keys are kohya_ss's `save_configuration` parameters (kohya_gui/lora_gui.py) and
CivitAI's trainingDetails, Kohya-shaped or AI Toolkit `params` (model-version.schema.ts).
"""

from __future__ import annotations

import difflib
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
# CivitAI's AI Toolkit params (its Flux trainer's) name these differently; the rest are the Kohya-shaped names.
_CIVITAI_KEYS |= {
    "lr": "unet_lr",
    "textEncoderLr": "text_encoder_lr",
    "trainTextEncoder": "train_text_encoder",
    "batchSize": "train_batch_size",
    "shuffleTokens": "shuffle_caption",
}
# CivitAI keys that are derived from the others and need no field.
_CIVITAI_DERIVED = {"targetSteps", "loraType"}
# CivitAI's base-model keys -> our family: trainingDetails.baseModel, its baseModelType (which names the
# family of a custom "civitai:<model>@<version>" base too), and the AI Toolkit params' ecosystem.
_CIVITAI_FAMILY_KEYS: dict[str, dict[str, str]] = {
    "baseModel": {
        **dict.fromkeys(("sd_1_5", "anime", "semi", "realistic"), "sd15"),
        **dict.fromkeys(("sdxl", "pony", "illustrious"), "sdxl"),
        "flux_dev": "flux",
    },
    "baseModelType": {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux"},
    "ecosystem": {"sd1": "sd15", "sdxl": "sdxl", "flux1": "flux"},
}
# CivitAI engines it runs for flux_dev only (training.ts: isValidRapid; x-flux, its earlier Flux engine).
_CIVITAI_FLUX_ENGINES = {"rapid", "x-flux"}

# FLUX.1 fields: sd-scripts' names, which kohya_ss's GUI JSON uses too (nf4_base and sigmoid_scale are ours
# there: kohya_ss has no NF4 and no FLUX sigmoid_scale). A non-FLUX file's FLUX keys are the GUI's hidden
# FLUX panel, so they stay unknown.
_FLUX_FIELDS = (
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "model_prediction_type",
    "guidance_scale",
    "t5xxl_max_token_length",
    "apply_t5_attn_mask",
    "fp8_base",
    "nf4_base",
    "clip_l",
    "t5xxl",
    "ae",
)
# kohya_ss's checkboxes of the model families we do not train (it saves each, checked or not).
_KOHYA_OTHER_MODELS = {
    "sd3_checkbox": "SD3",
    "hunyuan_image_checkbox": "HunyuanImage",
    "anima_checkbox": "Anima",
    "lumina_checkbox": "Lumina",
}

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
    "flux1_checkbox",
    *_KOHYA_OTHER_MODELS,
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
    return isinstance(data.get("params"), dict) or any(key in data for key in _CIVITAI_KEYS if key != "resolution")


def _checked(value: Any) -> bool:
    return value in (True, "true", "True")


def _civitai_family(data: dict[str, Any]) -> tuple[str, str] | None:
    """The family CivitAI's base-model keys (or a Flux-only engine) name, with the key that named it."""
    for key, families in _CIVITAI_FAMILY_KEYS.items():
        value = data.get(key)
        if value is None or (key == "baseModel" and str(value).startswith("civitai:")):
            continue  # a custom base: its baseModelType names the family
        if str(value) not in families:
            raise ConfigError(
                f"field {key!r}: {value!r} is not a base model this trainer trains ({', '.join(families)})"
            )
        return families[str(value)], key
    if data.get("engine") in _CIVITAI_FLUX_ENGINES:
        return "flux", "engine"
    return None


def _from_civitai(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    if isinstance(data.get("params"), dict):  # CivitAI's trainingDetails: the base model beside the run's params
        data = {key: value for key, value in data.items() if key != "params"} | data["params"]
    family = _civitai_family(data)
    # The engine is used only where it names the family ("kohya" says nothing of it).
    used = _CIVITAI_DERIVED | _CIVITAI_FAMILY_KEYS.keys() | ({"engine"} if family and family[1] == "engine" else set())
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in _CIVITAI_KEYS:
            if value is None or (key == "optimizerArgs" and value == "(empty)"):
                continue  # AI Toolkit's nulls and CivitAI's "(empty)": unset, so the preset's value
            fields[_CIVITAI_KEYS[key]] = value
            origin[_CIVITAI_KEYS[key]] = key
        elif key == "samplePrompts":  # trainingDetails' prompts, one per line as ours; CivitAI's blank slots dropped
            prompts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            if text := "\n".join(str(prompt) for prompt in prompts if str(prompt).strip()):
                fields["sample_prompts"], origin["sample_prompts"] = text, key
        elif key not in used:
            unknown.append(key)
    if "textEncoderLR" in data and "train_text_encoder" not in fields:  # CivitAI trains the encoders at LR > 0
        fields["train_text_encoder"] = _as_float(data["textEncoderLR"], 0.0) > 0
        origin["train_text_encoder"] = "textEncoderLR"
    if family:
        fields["model_family"], origin["model_family"] = family
    elif _as_int(data.get("resolution"), 0) >= 1024:  # without a base model, CivitAI's 1024 px ones are SDXL
        fields["model_family"], origin["model_family"] = "sdxl", "resolution"
    lora_type = data.get("loraType", "lora")
    if str(lora_type).lower() != "lora":
        raise ConfigError(f"field 'loraType': {lora_type!r} is not supported; only 'lora'")
    return fields, origin, unknown


def _kohya_family(data: dict[str, Any]) -> tuple[str, str] | None:
    """The family kohya_ss's model checkboxes name, with the key that named it; our export's own
    `model_family` key wins."""
    if "model_family" in data:
        return None
    checked = [key for key in ("sdxl", "flux1_checkbox", *_KOHYA_OTHER_MODELS) if _checked(data.get(key))]
    if len(checked) > 1:
        raise ConfigError(f"fields {' and '.join(map(repr, checked))} are checked together; a run trains one model")
    if checked and checked[0] in _KOHYA_OTHER_MODELS:
        key = checked[0]
        raise ConfigError(f"field {key!r}: {_KOHYA_OTHER_MODELS[key]} is not a model family this trainer trains")
    if checked:
        return ("sdxl", "sdxl") if checked[0] == "sdxl" else ("flux", "flux1_checkbox")
    if "sdxl" in data or "v2" in data:
        return "sd15", "v2"
    return None


def _from_kohya_gui(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    # The GUI writes "" for unset values, and max_train_epochs 0 for "epoch counts": those take our defaults.
    data = {key: value for key, value in data.items() if value != "" and value is not None}
    if str(data.get("max_train_epochs")) == "0":
        del data["max_train_epochs"]
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    family = _kohya_family(data)
    if family:
        fields["model_family"], origin["model_family"] = family
    flux = fields.get("model_family", data.get("model_family")) == "flux"
    for key, value in data.items():
        if key in LoraConfig.model_fields and (flux or key not in _FLUX_FIELDS):
            fields[key] = value
            origin[key] = key
        elif key not in _KOHYA_RENAMED | _KOHYA_RUN_PATHS and not (flux and key == "model_type"):
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
    if flux and data.get("model_type", "flux") != "flux":  # kohya_ss's FLUX panel also trains Chroma
        raise ConfigError(f"field 'model_type': {data['model_type']!r} is not supported; only FLUX.1 ('flux')")
    lora_type = data.get("LoRA_type", "Standard")
    if lora_type == "Flux1" and not flux:  # kohya_ss's name for sd-scripts' FLUX.1 LoRA (networks.lora_flux)
        raise ConfigError("field 'LoRA_type': 'Flux1' is a FLUX.1 LoRA, but flux1_checkbox is not checked")
    if lora_type not in ("Standard", "Flux1"):
        raise ConfigError(
            f"field 'LoRA_type': {lora_type!r} is not supported; only 'Standard' LoRA ('Flux1' on FLUX.1)"
        )
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
        keys = ", ".join(_with_guess(key) for key in sorted(unknown))
        warnings.warn(ConfigWarning(f"{path}: ignoring keys this trainer does not use: {keys}"), stacklevel=2)
    return ConfigFile(path, fields, origin, unknown)


def _with_guess(key: str) -> str:
    """`key`, and the known key it is likely a typo of (`leraning_rate (did you mean learning_rate?)`)."""
    known = {*LoraConfig.model_fields, *_KOHYA_RENAMED, *_CIVITAI_KEYS}
    if key in known:  # a setting of ours that this file's family does not use: not a typo
        return key
    # Close enough for a slip of the keys (leraning_rate: 0.92), not for kohya's other settings
    # (max_train_steps is not max_train_epochs: 0.84).
    guess = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.88)
    return f"{key} (did you mean {guess[0]}?)" if guess else key


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
    """The kohya_ss GUI LoRA-tab JSON of a run; `read_config_file` reads it back unchanged.

    A FLUX.1 run is what kohya_ss saves for one (flux1_checkbox, LoRA_type Flux1, the FLUX keys), so kohya_ss
    loads it as such; an SD run leaves the FLUX keys out, as the SD families ignore them.
    """
    flux = config.model_family == "flux"
    out: dict[str, Any] = {"LoRA_type": "Flux1" if flux else "Standard"}
    for name in LoraConfig.model_fields:
        if name in _FLUX_FIELDS and not flux:
            continue
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
    if flux:
        out["flux1_checkbox"] = True
        out |= {name: getattr(config, name) or "" for name in ("clip_l", "t5xxl", "ae")}  # the GUI's "" is unset
    out["train_data_dir"] = str(train_data_dir)
    out["output_dir"] = str(output_dir)
    out["output_name"] = output_name
    out["save_model_as"] = "safetensors"
    return dict(sorted(out.items()))


def write_kohya_gui(path: Path, config: LoraConfig, **paths: Any) -> None:
    """Write `to_kohya_gui` atomically as indented JSON."""
    atomic_write_text(path, json.dumps(to_kohya_gui(config, **paths), indent=2) + "\n")
