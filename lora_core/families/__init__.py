"""The model families, one module each, and the registry that is the only place listing them.

Adding a family is one module (a `ModelFamily` subclass and its `FAMILY`)
and one entry here. The order is the order detection tries them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from lora_core.families import flux, sd15, sdxl
from lora_core.families.family import LoraModule, ModelFamily

if TYPE_CHECKING:  # the config model loads the checks' libraries: the command line lists presets without them
    from lora_core.config.lora_config import LoraConfig

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Preset",
    "family_named",
    "family_of_lora",
    "network_shape",
    "preset_config",
    "preset_for",
]

FAMILIES: dict[str, ModelFamily] = {
    "sd15": sd15.FAMILY,
    "sdxl": sdxl.FAMILY,
    "flux": flux.FAMILY,
}

# Every family's presets by name; the first is the default.
PRESETS: dict[str, Mapping[str, Any]] = {name: values for f in FAMILIES.values() for name, values in f.presets.items()}
Preset = StrEnum("Preset", {name: name for name in PRESETS})  # type: ignore[misc]  # the CLI's and the UI's choices
DEFAULT_PRESET = next(iter(PRESETS))


def family_named(name: str) -> ModelFamily:
    """The family registered as `name` (a config's `model_family`); a `ConfigError` listing them otherwise."""
    from lora_core.config.lora_config import ConfigError

    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model_family {name!r}; choose one of: {', '.join(FAMILIES)}") from None


def family_of_lora(metadata: Mapping[str, str]) -> ModelFamily | None:
    """The family a LoRA file says it was trained on (its `ss_*` metadata), if any says so."""
    return next((f for f in FAMILIES.values() if f.recognises_lora(metadata)), None)


def network_shape(modules: Mapping[str, LoraModule], family: ModelFamily) -> tuple[int, float]:
    """(rank, alpha) of the network that trains a file's modules on `family`: what `network_dim` and
    `network_alpha` must be to continue it (a fused module of the file is several of the network's)."""
    ours = family.from_file(modules)
    if not ours:
        raise ValueError(f"none of the file's {len(modules)} modules is a {family.label} LoRA module")
    return max(down.shape[0] for down, _, _ in ours.values()), next(iter(ours.values()))[2]


def preset_for(family: str) -> str:
    """The first preset of `family`: where a config file that names only its family starts from."""
    return next(iter(family_named(family).presets))


def preset_config(preset: Preset | str | None = None) -> LoraConfig:
    """The recipe's settings for a preset (default: the first family's first, `sd15`)."""
    from lora_core.config.lora_config import ConfigError, LoraConfig

    name = str(preset.value if isinstance(preset, StrEnum) else preset or DEFAULT_PRESET)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return LoraConfig(**PRESETS[name])
