"""The base model a LoRA is trained on: SD1.5 or SDXL, from wherever the user keeps it.

`load_base_model` takes what kohya_ss's `pretrained_model_name_or_path` takes:
a hub id, a local diffusers folder, or a single-file checkpoint (`.safetensors`,
or a `.ckpt` read with `weights_only=True`), plus `builtin:tiny-sd15` and
`builtin:tiny-sdxl` for runs with no model at all. SDXL is detected from the
folder or file, or taken from the config's `sdxl`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.foundation.errors import UserError
from lora_core.foundation.hub import hub_unreachable, model_identity, offline_help
from lora_core.foundation.tiny_models import is_builtin, materialize

__all__ = [
    "BaseModel",
    "BaseModelError",
    "check_config_matches",
    "load_base_model",
    "model_identity",
    "require_base_model",
]


_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every dtype cast that some modules "should be kept in float32: []", naming none
    (its list is empty, not None); each epoch would print it, and it is nobody's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())


class BaseModelError(UserError, RuntimeError):
    """The base model cannot be loaded; the message says how to fix it."""


@dataclass
class BaseModel:
    """The parts training needs, loaded once per process."""

    spec: str
    sdxl: bool
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    pipeline_class: type = field(repr=False, default=object)

    @property
    def components(self) -> dict[str, Any]:
        """The trainable parts by the names kohya's prefixes use."""
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet} | dict(zip(names, self.text_encoders, strict=True))

    def place(self, device: Any, dtype: Any) -> None:
        """The frozen weights on `device` in `dtype`; the VAE in fp32 there (fp16 VAEs overflow to NaN)."""
        import torch

        for component in self.components.values():
            component.to(device, dtype=dtype)
        self.vae.to(device, dtype=torch.float32)

    @property
    def version(self) -> str:
        """sd-scripts' `ss_base_model_version`."""
        if self.sdxl:
            return "sdxl_base_v1-0"
        v_pred = self.noise_scheduler.config.prediction_type == "v_prediction"
        v2 = getattr(self.text_encoders[0].config, "hidden_size", 768) == 1024
        return f"sd_v{2 if v2 else 1}{'_v' if v_pred else ''}"


def require_base_model(spec: str | None) -> str:
    """`spec`, or a clear error when none was given (checked before any work is done)."""
    if not spec:
        raise BaseModelError(
            "no base model: pass --base-model (a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
            "a local diffusers folder or a .safetensors checkpoint), or builtin:tiny-sd15 / builtin:tiny-sdxl "
            "for a run with no model at all"
        )
    return spec


def check_config_matches(config: Any, base: BaseModel) -> None:
    """The config's `sdxl` and `v2` (kohya's model-type flags) must describe the loaded model.

    We detect the architecture from the model itself; a flag that disagrees is
    a config meant for another model, and training on would mislabel the LoRA.
    """
    if config.sdxl != base.sdxl:
        kind = "SDXL" if base.sdxl else "SD1.x/2.x"
        raise BaseModelError(f"base model {base.spec!r} is {kind}, but the config says sdxl={config.sdxl}")
    v2 = base.version.startswith("sd_v2")
    if not base.sdxl and config.v2 != v2:
        kind = "SD2.x" if v2 else "SD1.x"
        raise BaseModelError(
            f"base model {base.spec!r} is {kind}, but the config says v2={config.v2}; set v2 to {str(v2).lower()}"
        )


def _is_sdxl_folder(folder: Path) -> bool:
    index = json.loads((folder / "model_index.json").read_text())
    return "XL" in index.get("_class_name", "") or "text_encoder_2" in index


def load_base_model(spec: str | None, sdxl: bool | None = None, config_folder: str | None = None) -> BaseModel:
    """Load the UNet, VAE, text encoder(s), tokenizer(s) and the training noise schedule.

    `sdxl` None means detect; a single-file checkpoint needs its diffusers
    config, which comes from `config_folder` (a local diffusers folder of the
    same architecture) or the hub's cache.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    spec = require_base_model(spec)
    source: str = str(materialize(spec)) if is_builtin(spec) else spec
    path = Path(source).expanduser()
    kwargs: dict[str, Any] = {}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"base model {spec!r}: not a diffusers folder (no model_index.json)")
        detected = _is_sdxl_folder(path)
        loader = "from_pretrained"
    elif path.is_file():
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise BaseModelError(f"base model {spec!r}: want a .safetensors or .ckpt checkpoint")
        detected = bool(sdxl)
        loader = "from_single_file"
        if config_folder:
            kwargs["config"] = str(materialize(config_folder)) if is_builtin(config_folder) else config_folder
    elif source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix.lower() in _FILE_SUFFIXES:
        raise BaseModelError(f"base model {spec!r}: no such file or folder")
    else:
        detected = bool(sdxl) or "xl" in source.lower()
        loader = "from_pretrained"
    if sdxl is not None and sdxl != detected and loader == "from_pretrained" and path.is_dir():
        kind = "SDXL" if detected else "SD1.x/2.x"
        raise BaseModelError(f"base model {spec!r} is {kind}, but the config says sdxl={sdxl}; fix one of them")
    pipeline_class = StableDiffusionXLPipeline if detected else StableDiffusionPipeline
    load = getattr(pipeline_class, loader)
    extra = {} if detected else {"safety_checker": None, "requires_safety_checker": False}
    try:
        try:
            pipeline = load(source, local_files_only=True, **extra, **kwargs)
        except OSError:
            if path.exists():
                raise
            why = hub_unreachable(source)
            if why:
                message = offline_help(
                    "base model", source, "--base-model", "pretrained_model_name_or_path", "builtin:tiny-sd15"
                )
                raise BaseModelError(f"{message} ({why})") from None
            pipeline = load(source, **extra, **kwargs)
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
    text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if detected else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if detected else [])
    return BaseModel(
        spec=spec,
        sdxl=detected,
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        pipeline_class=pipeline_class,
    )
