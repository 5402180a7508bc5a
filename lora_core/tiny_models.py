"""Tiny, randomly initialised models built from configs: the real code paths, offline.

There is no model hub on CI or in the demo, and nothing may download weights at
run or test time. A `builtin:<name>` model spec names one of these: it is built
once (seeded, so always the same weights) into a local folder with
`save_pretrained`, then loaded back through exactly the code that loads a real
local copy. Its outputs are nonsense words, but every stage runs for real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["BUILTIN_PREFIX", "builtin_home", "is_builtin", "materialize"]

BUILTIN_PREFIX = "builtin:"
# Bump when a builder changes, so caches keyed on the model spec are invalidated.
_VERSION = "v2"

# Words a captioner of portraits would use, so tiny-BLIP output reads like a caption.
_CAPTION_WORDS = """
    a an the of in on at with and his her their is are man woman person people young old
    picture photo portrait close up standing sitting smiling looking camera wearing suit tie shirt
    jacket dress hat glasses hair beard face hand hands holding remote control microphone phone
    front flag desk office room window wall table chair podium stage crowd outside inside building
    white black blue red green dark light gray brown background day night sunny
    talking speaking walking waving pointing reading laughing serious
"""


def builtin_home() -> Path:
    """Where builtin models are built: `$SUBJECT_LORA_HOME/builtin`, else `~/.cache/subject-lora/builtin`."""
    root = os.environ.get("SUBJECT_LORA_HOME")
    base = Path(root) if root else Path.home() / ".cache" / "subject-lora"
    return base / "builtin"


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def materialize(spec: str, home: Path | None = None) -> Path:
    """Build the builtin model `spec` (e.g. ``builtin:tiny-blip``) if needed; return its folder.

    Built into a temporary folder and renamed into place, so a crash never
    leaves half a model that later loads.
    """
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin model {spec!r}; builtin models: {', '.join(_specs())}")
    home = Path(home) if home is not None else builtin_home()
    target = home / f"{name}-{_VERSION}"
    if (target / "config.json").is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=home))
    try:
        _BUILDERS[name](staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _specs() -> list[str]:
    return [BUILTIN_PREFIX + name for name in _BUILDERS]


def _build_tiny_blip(folder: Path) -> None:
    """BLIP captioning with a 32-wide vision and text model and a 140-word tokenizer."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(specials + _CAPTION_WORDS.split() + [",", "."]))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            # BLIP's default 1e-10 makes every image look alike; captions should differ.
            "initializer_range": 0.5,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
            "initializer_range": 0.5,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    # Random weights never choose to stop; make [SEP] likely so captions end near
    # min_length, as a real BLIP's do, instead of running to max_length.
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab["[SEP]"]] = 12.0
    model.save_pretrained(folder)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


_BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-blip": _build_tiny_blip}
