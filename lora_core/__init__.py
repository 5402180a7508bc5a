"""The pure library behind the pipeline: no Prefect here, so every stage is testable alone.

One module per concept: `config` (the settings), `layout` (the seed's folders),
`sources` (reading an input safely), `ingest`, `manifest`, `faces`, `checks` (one record a check), `orientation`,
`quality`, `image_store`, `buckets`, `captioning`, `models` (the base model),
`precision` (device and mixed precision), `network` (the LoRA layers), `train_data`,
`conditioning`, `optim`, `training` (the step and the epoch loop), `run_state` (a run
on disk), `metadata` (kohya's ss_* keys), `memory` (the out-of-memory ladder),
`lora_io` (kohya's LoRA files), `sampling`, `evaluation`, `selection`, `hub` (where
models come from), `tiny_models` (offline models built from configs), `fs` (atomic writes).
"""

__all__ = [
    "buckets",
    "captioning",
    "checks",
    "conditioning",
    "config",
    "evaluation",
    "faces",
    "fs",
    "hub",
    "image_store",
    "ingest",
    "layout",
    "lora_io",
    "manifest",
    "memory",
    "metadata",
    "models",
    "network",
    "optim",
    "orientation",
    "precision",
    "quality",
    "run_state",
    "sampling",
    "selection",
    "sources",
    "tiny_models",
    "train_data",
    "training",
]
