"""A run's settings from their layers: the preset, then a config file, then explicit overrides.

The command line, the Prefect deployments and the tests all build a run's
`LoraConfig` this one way, so a value set in a kohya_ss or CivitAI file and a
flag given on top of it combine the same wherever the run starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_core.config.kohya import describe_validation_error, read_config_file
from lora_core.config.lora_config import ConfigError, LoraConfig
from lora_core.config.settings import DEFAULT_CAPTION_MODEL
from lora_core.families import Preset, family_named, preset_config, preset_for
from lora_core.foundation.tiny_models import is_builtin

TINY_CAPTION_MODEL = "builtin:tiny-blip"

__all__ = ["load_config", "merge_settings", "resolve_config", "subject_config"]


def merge_settings(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it: nested settings merge key by key; a None change keeps the base."""
    merged = dict(base)
    for key, value in changes.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | str, preset: Preset | str | None = None) -> LoraConfig:
    """A kohya_ss GUI or CivitAI config file laid over `preset`; without one, over the first preset of the
    family the file names (kohya's `sdxl: true` starts from `sdxl`). Raises `ConfigError` naming the file."""
    read = read_config_file(path)
    if not preset and read.model_family:
        try:
            preset = preset_for(read.model_family)
        except ConfigError as err:
            raise ConfigError(f"{path}: field 'model_family': {err}") from None
    return read.over(preset_config(preset))


def resolve_config(
    preset: Preset | str | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    origin: str = "overrides",
) -> LoraConfig:
    """The preset (default: sd15, or sdxl for an SDXL config file), the file's values over it, then `overrides`
    (LoraConfig field names; nested settings as dicts; None values ignored).

    Raises `ConfigError` naming the file, or `origin` for an override, and the field; a config file's
    unknown keys warn with a `ConfigWarning`.
    """
    config = load_config(config_file, preset) if config_file else preset_config(preset)
    if overrides and any(value is not None for value in overrides.values()):
        try:
            config = LoraConfig.model_validate(merge_settings(config.model_dump(), overrides))
        except ValidationError as err:
            raise ConfigError(describe_validation_error(Path(origin), err, {})) from None
    try:
        family_named(config.model_family)
    except ConfigError as err:
        raise ConfigError(f"{config_file or origin}: field 'model_family': {err}") from None
    return config


def subject_config(
    preset: Preset | str | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base_model: str | None = None,
    caption_model: str | None = None,
    subject_type: str | None = None,
    mirror_policy: str | None = None,
    quality_policy: str | None = None,
    network_weights: Path | str | None = None,
    epochs: int | None = None,
    max_resumes: int | None = None,
    recaption: bool | None = None,
    origin: str = "overrides",
) -> LoraConfig:
    """A subject's config from what a person names: the command line's flags, the train-subject
    deployment's parameters, a batch file's entry. Preset, then config file, then `overrides`, then the
    named settings (each None: not given). Raises `ConfigError` naming `origin` and the field."""
    named = {
        "pretrained_model_name_or_path": base_model,
        "network_weights": str(network_weights) if network_weights else None,
        "max_train_epochs": epochs,
        "subject_type": subject_type,
        "selection": {"max_resumes": max_resumes},
        "checks": {"mirror_policy": mirror_policy, "quality_policy": quality_policy},
        "captioning": {"model": caption_model, "recaption": recaption},
    }
    config = resolve_config(preset, config_file, merge_settings(dict(overrides or {}), named), origin)
    if is_builtin(config.pretrained_model_name_or_path or "") and config.captioning.model == DEFAULT_CAPTION_MODEL:
        # A run on a builtin tiny model is a run with no model at all: its captions come from tiny-BLIP too,
        # unless a caption model was named.
        config = config.model_copy(
            update={"captioning": config.captioning.model_copy(update={"model": TINY_CAPTION_MODEL})}
        )
    return config
