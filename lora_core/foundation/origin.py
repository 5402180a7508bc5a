"""Where a run's settings were given, so an error names a setting the way its person wrote it.

The same check (a base model that is not there, a caption model the hub cannot
give) reaches three kinds of people: one typing flags, one filling in the
`train-subject` form in Prefect's UI (or a deployment's parameters), one
writing a batch file. "pass --base-model" means nothing to the last two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["COMMAND_LINE", "FORM", "Origin", "Setting"]

Setting = Literal["base_model", "caption_model", "device", "network_weights"]

# The name of each setting as each kind of origin spells it; None where that origin cannot set it directly.
_FLAGS: dict[str, str] = {
    "base_model": "--base-model",
    "caption_model": "--caption-model",
    "device": "--device",
    "network_weights": "--network-weights",
}
# The train-subject flow's parameters (the UI's form fields); network_weights goes in through `overrides`.
_FIELDS: dict[str, str] = {
    "base_model": "base_model",
    "caption_model": "caption_model",
    "device": "device",
    "network_weights": "overrides.network_weights",
}
# A batch file's subject keys (`lora_core.setup.subjects.BatchSubject`); the device is the worker's own.
_KEYS: dict[str, str] = {
    "base_model": "base_model",
    "caption_model": "caption_model",
    "device": "device (of the worker's train-subject deployment: a batch does not set it)",
    "network_weights": "overrides: {network_weights: ...}",
}


@dataclass(frozen=True)
class Origin:
    """The command line, the train-subject form, or one entry of a batch file (`where`: file and entry)."""

    kind: Literal["command line", "form", "batch"]
    where: str = ""

    @classmethod
    def batch(cls, where: str) -> Origin:
        """The settings of one batch entry, `where` naming the file and the entry."""
        return cls("batch", where)

    def name(self, setting: Setting) -> str:
        """The setting as this origin spells it: `--base-model`, the `base_model` field, the `base_model` key."""
        if self.kind == "command line":
            return _FLAGS[setting]
        if self.kind == "form":
            return f"train-subject's {_FIELDS[setting]} field"
        return f"the batch key {_KEYS[setting]}" + (f" ({self.where})" if self.where else "")

    def give(self, setting: Setting, value: str) -> str:
        """How to give `setting` the value `value` from here, as an instruction."""
        if self.kind == "command line":
            return f"pass `{_FLAGS[setting]} {value}`"
        if self.kind == "form":
            return f"set train-subject's {_FIELDS[setting]} field to {value}"
        entry = f" in {self.where}" if self.where else ""
        return f"set `{_KEYS[setting]}: {value}`{entry} (or in the batch's defaults)"

    def __str__(self) -> str:
        """What a config error says the settings came from."""
        return {"command line": "the command line", "form": "train-subject's parameters"}.get(self.kind, self.where)


COMMAND_LINE = Origin("command line")
FORM = Origin("form")
