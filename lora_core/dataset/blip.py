"""The BLIP captioning model: found by hub id, local folder or `builtin:tiny-blip`, loaded only when used.

The recipe runs kohya_ss's BLIP tool; this is transformers'
`BlipForConditionalGeneration` continuing a prompt ("a picture of ", as kohya's
BLIP does), with the prompt removed from its words. A model that cannot be
loaded is a `CaptionModelError` whose message says how to get it (offline: the
download command and the setting to point at a local copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lora_core.config.settings import CaptionSettings
from lora_core.dataset.caption_text import clean_caption
from lora_core.foundation.errors import UserError
from lora_core.foundation.hub import hub_unreachable, model_identity, offline_help
from lora_core.foundation.origin import COMMAND_LINE, Origin
from lora_core.foundation.tiny_models import is_builtin, materialize

__all__ = ["TINY", "BlipCaptioner", "CaptionModelError", "check_caption_model"]

TINY = "builtin:tiny-blip"


class CaptionModelError(UserError, RuntimeError):
    """The captioning model cannot be loaded; the message says how to fix it."""


def check_caption_model(spec: str, origin: Origin = COMMAND_LINE, *, hub: bool = True) -> None:
    """The caption model is there, before any work: a builtin, a local model folder, or a hub id in the local
    Hugging Face cache or on a hub that answers (`hub` False: not looked for here). Nothing is loaded.
    Raises the `CaptionModelError` that captioning would raise after ingest, checks and crop, naming the
    setting as `origin` spells it."""
    if is_builtin(spec):
        if spec != TINY:
            raise CaptionModelError(f"caption model {spec!r} ({origin.name('caption_model')}): the builtin is {TINY}")
        return
    try:
        source, local = BlipCaptioner(spec)._folder_or_id()  # a bad local path raises here
    except CaptionModelError as err:
        raise CaptionModelError(f"{err} ({origin.name('caption_model')})") from None
    if local or not hub:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return
    except ValueError:  # huggingface_hub's check of the id's form
        raise CaptionModelError(
            f"caption model {spec!r} ({origin.name('caption_model')}): neither a folder here nor a hub id"
        ) from None
    why = hub_unreachable(source)
    if why:
        message = offline_help("caption model", source, why, "caption_model", "captioning.model", TINY, origin)
        raise CaptionModelError(message)


class BlipCaptioner:
    """A BLIP captioning model named by a hub id, a local folder, or `builtin:tiny-blip`.

    Nothing is loaded until the first caption is asked for, so a run whose
    captions are all cached never loads the model.
    """

    def __init__(self, spec: str, device: str | None = None) -> None:
        self.spec = spec
        self._device = device
        self._loaded: tuple[Any, Any] | None = None

    @property
    def identity(self) -> str:
        """What makes this model's output what it is, known without loading it."""
        return model_identity(self.spec)

    def _folder_or_id(self) -> tuple[str, bool]:
        """Where to load from, and whether it is a local folder."""
        if is_builtin(self.spec):
            return str(materialize(self.spec)), True
        path = Path(self.spec).expanduser()
        if path.exists():
            if not (path.is_dir() and (path / "config.json").is_file()):
                raise CaptionModelError(
                    f"caption model {self.spec!r}: not a BLIP model folder (want a folder with config.json, "
                    "as `save_pretrained` or `hf download` writes it)"
                )
            return str(path), True
        if self.spec.startswith((".", "/", "~")) or self.spec.count("/") > 1:
            raise CaptionModelError(f"caption model {self.spec!r}: no such folder")
        return self.spec, False

    def load(self) -> tuple[Any, Any]:
        """(processor, model) on the device: fp16 on a GPU, fp32 on the CPU."""
        if self._loaded is not None:
            return self._loaded
        import torch
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

        source, local = self._folder_or_id()
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32

        def from_pretrained(**kwargs: Any) -> tuple[Any, Any]:
            # The PIL image processor: the default one wants torchvision, which we don't need.
            processor = BlipProcessor(
                image_processor=BlipImageProcessorPil.from_pretrained(source, **kwargs),
                tokenizer=AutoTokenizer.from_pretrained(source, **kwargs),
            )
            model = BlipForConditionalGeneration.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
            return processor, model

        try:
            processor, model = from_pretrained(local_files_only=True)
        except OSError as err:
            if local:
                raise CaptionModelError(f"caption model {self.spec!r}: cannot load it: {err}") from err
            why = hub_unreachable(source)
            if why:
                field = "captioning.model"
                message = offline_help("caption model", source, why, "caption_model", field, TINY, COMMAND_LINE)
                raise CaptionModelError(message) from None
            try:
                processor, model = from_pretrained()
            except OSError as err:  # a typo'd or private repo: the hub answers, but not with a model
                raise CaptionModelError(f"caption model {self.spec!r}: cannot download it: {err}") from None
        self._loaded = (processor, model.to(device).eval())
        return self._loaded

    def caption(self, images: Sequence[Image.Image], settings: CaptionSettings) -> list[str]:
        """BLIP's captions of `images` in one batch, the prompt removed."""
        import torch

        processor, model = self.load()
        prompt = settings.prompt
        inputs = processor(images=list(images), text=[prompt] * len(images) if prompt else None, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if settings.beam_search:
            options: dict[str, Any] = {"num_beams": settings.num_beams, "do_sample": False}
        else:
            options = {"do_sample": True, "top_p": settings.top_p, "num_beams": 1}
        with torch.inference_mode():
            out = model.generate(**inputs, min_length=settings.min_length, max_length=settings.max_length, **options)
        texts = processor.batch_decode(out, skip_special_tokens=True)
        head = clean_caption(prompt).lower()
        return [clean_caption(t[len(head) :] if head and t.lower().startswith(head) else t) for t in texts]
