"""A batch file: several subjects to train in one night, one entry each, with shared defaults.

    defaults:                     # any subject key; each subject's own keys win
      base_model: /models/sd15.safetensors
      overrides: {selection: {max_resumes: 1}}
    subjects:
      - {photos: /data/photos/anna, token: ann4}
      - photos: /data/photos/ben.zip
        token: b3n
        preset: sdxl
        overrides: {max_train_epochs: 8}   # merged with the defaults' overrides
        timeout_minutes: 90                # cancelled when it runs longer (default: no limit)

The whole file is checked before anything starts (YAML, keys, tokens, photo
paths, each subject's resolved `LoraConfig`), and every problem is reported
at once, naming the entry. Relative paths are taken from the batch file's
folder, so a file means the same on every worker that mounts it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_core.config.kohya import describe_validation_error
from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SubjectType
from lora_core.families import Preset
from lora_core.foundation.errors import UserError
from lora_core.foundation.layout import SubjectLayout, validate_token
from lora_core.foundation.origin import Origin
from lora_core.setup.preflight import preflight
from lora_core.setup.resolve import merge_settings, subject_config

__all__ = ["SUBJECT_KEYS", "BatchError", "BatchSubject", "load_batch", "subject_outcome"]


class BatchError(UserError, ValueError):
    """A batch file that cannot run as written; the message names each entry and field at fault."""


class BatchSubject(BaseModel):
    """One subject of a batch, its defaults applied: what a `train-subject` run is started with."""

    model_config = ConfigDict(extra="forbid")

    photos: Path
    token: str
    workdir: Path = Path("work")
    preset: Preset | None = None
    config: Path | None = Field(None, description="kohya_ss GUI LoRA JSON or CivitAI training JSON")
    base_model: str | None = None
    caption_model: str | None = None
    subject_type: SubjectType | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="LoraConfig fields, nested sections merged")
    timeout_minutes: float | None = Field(
        None, gt=0, description="cancel the subject's run when it has run this long (default: no limit)"
    )

    def lora_config(self, origin: str) -> LoraConfig:
        """The config the subject's run will resolve (`lora_core.setup.resolve.subject_config`)."""
        return subject_config(
            self.preset,
            self.config,
            self.overrides,
            base_model=self.base_model,
            caption_model=self.caption_model,
            subject_type=self.subject_type,
            origin=origin,
        )

    def parameters(self) -> dict[str, Any]:
        """The `train-subject` flow's parameters, as JSON."""
        return {
            "photos": str(self.photos),
            "token": self.token,
            "workdir": str(self.workdir),
            "preset": self.preset,
            "config_file": str(self.config) if self.config else None,
            "base_model": self.base_model,
            "caption_model": self.caption_model,
            "subject_type": self.subject_type,
            "overrides": self.overrides,
        }


SUBJECT_KEYS = tuple(BatchSubject.model_fields)
_PATH_KEYS = ("photos", "workdir", "config")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchError(f"{path}: no such batch file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BatchError(f"{path}: not a readable YAML file: {err}") from None
    if not isinstance(data, dict) or set(data) - {"defaults", "subjects"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BatchError(f"{path}: expected a mapping with 'defaults:' (optional) and 'subjects:', got {found}")
    return data


def _entry(defaults: dict[str, Any], entry: Any, folder: Path) -> dict[str, Any]:
    """`entry` over the defaults (its overrides merged key by key), relative paths from `folder`."""
    if not isinstance(entry, dict):
        raise TypeError(f"expected a mapping of {', '.join(SUBJECT_KEYS)}, got {entry!r}")
    merged = {**defaults, **entry}
    if isinstance(defaults.get("overrides"), dict) and isinstance(entry.get("overrides"), dict):
        merged["overrides"] = merge_settings(defaults["overrides"], entry["overrides"])
    for key in _PATH_KEYS:
        if isinstance(merged.get(key), str):
            merged[key] = Path(os.path.normpath(folder / Path(merged[key]).expanduser()))
    return merged


def _check(subject: BatchSubject, where: str) -> list[str]:
    """What stops `subject` from starting, named for `where`: token, photos, the resolved config."""
    problems = []
    try:
        validate_token(subject.token)
    except UserError as err:
        problems.append(f"{where}: {err}")
    if not subject.photos.exists():
        problems.append(f"{where}: photos: {subject.photos} does not exist (on this machine)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the subject's own run reports a config file's unknown keys
            config = subject.lora_config(origin=where)
    except UserError as err:
        return [*problems, str(err)]
    try:  # the models as far as every machine sees them alike; each subject's run checks the rest where it trains
        photos = subject.photos if subject.photos.exists() else None
        preflight(config, None, Origin.batch(""), photos=photos, workdir=subject.workdir, hub=False)
    except UserError as err:
        problems.append(f"{where}: {err}")
    return problems


def load_batch(path: Path | str) -> list[BatchSubject]:
    """Every subject of the batch file at `path`, checked. Raises `BatchError` listing every problem."""
    path = Path(path).expanduser().absolute()
    data = _read(path)
    defaults, entries = data.get("defaults") or {}, data.get("subjects")
    if not isinstance(defaults, dict) or set(defaults) - set(SUBJECT_KEYS):
        raise BatchError(f"{path}: 'defaults:' takes subject keys ({', '.join(SUBJECT_KEYS)}), got {defaults!r}")
    if not isinstance(entries, list) or not entries:
        raise BatchError(f"{path}: 'subjects:' must list at least one subject")
    subjects, problems, seen = [], [], {}
    for index, entry in enumerate(entries):
        token = entry.get("token") if isinstance(entry, dict) else None
        where = f"{path}: subjects[{index}]" + (f" ({token})" if token else "")
        try:
            subject = BatchSubject.model_validate(_entry(defaults, entry, path.parent))
        except (TypeError, ValidationError) as err:
            text = describe_validation_error(Path(where), err, {}) if isinstance(err, ValidationError) else err
            problems.append(f"{where}: {text}" if isinstance(err, TypeError) else str(text))
            continue
        problems += _check(subject, where)
        key = (subject.workdir.resolve(), subject.token)
        if key in seen:
            problems.append(f"{where}: token {subject.token!r} in {subject.workdir} is also subjects[{seen[key]}]")
        seen.setdefault(key, index)
        subjects.append(subject)
    if problems:
        raise BatchError(f"{path}: {len(problems)} problem(s), nothing started:\n" + "\n".join(problems))
    return subjects


def subject_outcome(subject: BatchSubject) -> dict[str, Any]:
    """What the subject's finished run left for the batch summary: verdict, chosen epoch and the LoRA to use
    (from `result_current/selection.json`); empty values where the run chose nothing."""
    layout = SubjectLayout(subject.workdir, subject.token)
    try:
        record = json.loads((layout.result_current / "selection.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    final = layout.final_lora
    return {
        "verdict": record.get("verdict", ""),
        "chosen_epoch": record.get("chosen_epoch"),
        "lora": str(final) if record and final.is_file() else "",
    }
