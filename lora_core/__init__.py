"""The pure library behind the pipeline: no Prefect here, so every stage is testable alone.

One module per concept: `config` (the settings), `layout` (the seed's folders),
`sources` (reading an input safely), `ingest`, `manifest`, `buckets`, `captioning`,
`models` (the base model), `lora_io` (kohya's LoRA files), `training`, `hub` (where
models come from), `tiny_models` (offline models built from configs), `fs` (atomic writes).
"""

__all__ = [
    "buckets",
    "captioning",
    "config",
    "fs",
    "hub",
    "ingest",
    "layout",
    "lora_io",
    "manifest",
    "models",
    "sources",
    "tiny_models",
    "training",
]
