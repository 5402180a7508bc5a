"""Everything a run can be refused for that is known before it starts, checked before any work.

A missing base model found at "epoch 1", after minutes of ingest, checks, crop
and captions, wastes those minutes; so does an offline caption model found at
"captions". The command line checks these before Prefect starts; the
`train-subject` flow at its start (a run from the UI or a deployment); a
batch at its start, for every subject. Each names the setting as its person
gave it (`lora_core.foundation.origin`).
"""

from __future__ import annotations

from pathlib import Path

from lora_core.config.lora_config import LoraConfig
from lora_core.dataset.blip import check_caption_model
from lora_core.families.loading import check_base_model
from lora_core.foundation.origin import COMMAND_LINE, Origin
from lora_core.foundation.sources import all_captioned

__all__ = ["preflight"]


def preflight(
    config: LoraConfig,
    device: str | None,
    origin: Origin = COMMAND_LINE,
    *,
    photos: Path | None = None,
    workdir: Path | None = None,
    captions: bool = True,
    training: bool = True,
    hub: bool = True,
) -> None:
    """The device; the base model and the starting LoRA when the run reaches training; the caption model when
    it reaches captions (and `photos`, the work folder inside them left out, do not all come captioned).
    `hub`: False checks only what is the same on every machine (paths, builtins, a model named at all), not
    this machine's Hugging Face cache or network: a batch is checked where it runs, not where it trains.
    Raises the `UserError` that says what to fix. torch loads here (the device), so the command line calls
    this after its cheap checks."""
    from lora_core.training.precision import DeviceError, resolve_device
    from lora_core.training.state import check_starting_lora

    try:
        resolve_device(device)
    except DeviceError as err:
        raise DeviceError(f"{origin.name('device')}: {err}") from None
    if training:
        check_base_model(config.pretrained_model_name_or_path, config.model_family, origin, hub=hub)
        if config.network_weights:
            check_starting_lora(Path(config.network_weights), config.model_family)
    needs_blip = config.captioning.recaption or photos is None or not all_captioned(photos, workdir)
    if captions and needs_blip:
        check_caption_model(config.captioning.model, origin, hub=hub)
