"""The base model a LoRA is trained on, from wherever the user keeps it, recognised by its family.

`load_base_model` takes what kohya_ss's `pretrained_model_name_or_path` takes:
a hub id, a local diffusers folder, or a single-file checkpoint (`.safetensors`,
or a `.ckpt` read with `weights_only=True`), plus the `builtin:tiny-*` models
for runs with no model at all. The family is recognised from the folder, the
checkpoint's tensor names or the hub id; the config's `model_family` must agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_core.config.lora_config import LoraConfig
from lora_core.families import FAMILIES, family_named
from lora_core.families.family import LoadedModel, ModelFamily, read_checkpoint_keys
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS, UserError
from lora_core.foundation.hub import hub_unreachable, model_identity, offline_help
from lora_core.foundation.origin import COMMAND_LINE, Origin
from lora_core.foundation.tiny_models import is_builtin, materialize

__all__ = [
    "BaseModelError",
    "LoadedModel",
    "check_base_model",
    "check_config_matches",
    "load_base_model",
    "model_identity",
    "require_base_model",
]


_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_BUILTINS = " / ".join(f.builtin for f in FAMILIES.values() if f.builtin)  # runs with no model at all


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every dtype cast that some modules "should be kept in float32: []", naming none
    (its list is empty, not None); each epoch would print it, and it is nobody's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())


class BaseModelError(UserError, RuntimeError):
    """The base model cannot be loaded; the message says how to fix it."""


def require_base_model(spec: str | None, origin: Origin = COMMAND_LINE) -> str:
    """`spec`, or a clear error when none was given (checked before any work is done), naming the setting
    as `origin` spells it."""
    if not spec:
        raise BaseModelError(
            f"no base model: {origin.give('base_model', 'MODEL')} (a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5, a local diffusers folder or a .safetensors checkpoint), "
            f"or {_BUILTINS} for a run with no model at all"
        )
    return spec


def check_base_model(
    spec: str | None, family: str | None = None, origin: Origin = COMMAND_LINE, *, hub: bool = True
) -> None:
    """The base model is there, before any work: one of our builtins, a local diffusers folder or
    checkpoint of the named family, or a hub id in the local Hugging Face cache or on a hub that answers.

    Raises the `BaseModelError` that loading it would raise after the dataset stages, at once instead,
    naming the setting as `origin` (command line, form, batch file) spells it. `hub` False: a hub id is not
    looked for in this machine's cache or on the hub (another machine trains).
    """
    spec = require_base_model(spec, origin)
    named = family_named(family) if family else None
    if is_builtin(spec):  # its family is known by name: nothing is built or imported to tell
        # The named family where it owns the builtin too (a family built on another shares its tiny model).
        owners = [f for f in FAMILIES.values() if f.builtin == spec]
        found = named if named in owners else next(iter(owners), None)
        if found is None:
            raise BaseModelError(f"base model {spec!r}: no such builtin model; builtin base models: {_BUILTINS}")
        if named is not None and found is not named:
            raise BaseModelError(_mismatch(spec, found, named.name))
        return
    path = Path(spec).expanduser()
    try:
        found, _ = _recognise(spec, path, spec, named)
    except BaseModelError as err:  # not there, or not a model: named as the setting it came from
        raise BaseModelError(f"{err} ({origin.name('base_model')})") from None
    if named is not None and found is not None and found is not named:
        raise BaseModelError(_mismatch(spec, found, named.name))
    if path.exists() or not hub or _cached(spec):
        return
    why = hub_unreachable(spec)
    if why:
        field = "pretrained_model_name_or_path"
        raise BaseModelError(offline_help("base model", spec, why, "base_model", field, _BUILTINS, origin))


def _cached(repo_id: str) -> bool:
    """The hub id's diffusers index is in the local Hugging Face cache (a model downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_config_matches(config: LoraConfig, model: LoadedModel) -> None:
    """The config's `model_family` must be the loaded model's, and the family's own settings must fit it.

    We recognise the family from the model itself; a config that names another
    is meant for another model, and training on would mislabel the LoRA.
    """
    named = family_named(config.model_family)
    if named is not model.family:
        raise BaseModelError(_mismatch(model.spec, model.family, config.model_family))
    model.family.check_config(config, model)


def _mismatch(spec: str, found: ModelFamily, named: str) -> str:
    return (
        f"base model {spec!r} is {found.label}, but the config says model_family={named}; "
        f"set model_family to {found.name} (or use a {found.name} preset)"
    )


def _recognise(spec: str, path: Path, source: str, named: ModelFamily | None) -> tuple[ModelFamily | None, str]:
    """The family the model at `source` belongs to (None: cannot tell without loading), and the loader."""
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"base model {spec!r}: not a diffusers folder (no model_index.json)")
        index = json.loads((path / "model_index.json").read_text())
        return _first(lambda f: f.recognises_folder(index), named), "from_pretrained"
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise BaseModelError(f"base model {spec!r}: want a .safetensors or .ckpt checkpoint")
        try:
            keys = read_checkpoint_keys(path)
        except DAMAGED_FILE_ERRORS as err:
            raise BaseModelError(f"base model {spec!r}: not a readable safetensors file ({err})") from None
        found = None if keys is None else _first(lambda f: f.recognises_checkpoint(keys), named)
        return found, "from_single_file"
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix.lower() in _FILE_SUFFIXES:
        raise BaseModelError(f"base model {spec!r}: no such file or folder")
    return _first(lambda f: f.recognises_hub_id(source), named), "from_pretrained"


def _first(test: Any, named: ModelFamily | None) -> ModelFamily | None:
    """The named family when it recognises the model (several may: a family built on another), else the first."""
    if named is not None and test(named):
        return named
    return next((family for family in FAMILIES.values() if test(family)), None)


def load_base_model(
    spec: str | None,
    family: str | None = None,
    config_folder: str | None = None,
    parts: Mapping[str, str] | None = None,
) -> LoadedModel:
    """Load the denoiser, VAE, text encoder(s), tokenizer(s) and the training noise schedule.

    `family` None means recognise it; a named family must be the model's (a
    hub id is judged by its name; a `.ckpt`'s family cannot be told before
    loading: the named one is used). A single-file checkpoint needs its diffusers config, which comes
    from `config_folder` (a local diffusers folder of the same architecture) or
    the hub's cache. `parts`: components kept as files of their own (`LoraConfig.component_files`).
    """
    spec = require_base_model(spec)
    named = family_named(family) if family else None
    source: str = str(materialize(spec)) if is_builtin(spec) else spec
    path = Path(source).expanduser()
    found, loader = _recognise(spec, path, source, named)
    if named is not None and found is not None and found is not named:
        raise BaseModelError(_mismatch(spec, found, named.name))
    chosen = named or found or next(iter(FAMILIES.values()))
    options: dict[str, Any] = {}
    if loader == "from_single_file" and config_folder:
        options["config"] = str(materialize(config_folder)) if is_builtin(config_folder) else config_folder
    try:
        try:
            model = chosen.load(source, loader, {"local_files_only": True, **options}, parts or {})
        except OSError:
            if path.exists():
                raise
            why = hub_unreachable(source)
            if why:
                field = "pretrained_model_name_or_path"
                message = offline_help("base model", source, why, "base_model", field, _BUILTINS, COMMAND_LINE)
                raise BaseModelError(message) from None
            model = chosen.load(source, loader, options, parts or {})
    except BaseModelError:
        raise
    except Exception as err:
        hint = ""
        if loader == "from_single_file" and not config_folder:
            hint = (
                "; a single-file checkpoint needs its architecture's diffusers configs, which diffusers fetches "
                "from the hub: pass --base-model-config with a diffusers folder (or cached hub id) of the same "
                "architecture"
            )
        raise BaseModelError(f"base model {spec!r}: cannot load it: {err}{hint}") from err
    model.spec = spec
    return model
