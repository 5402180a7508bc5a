"""The pure library behind the pipeline: no Prefect here, so every stage is testable alone.

One module per concept, in seven layers. A module imports only from its own
layer and those below it, so the layers read bottom-up; `LAYERS` is the table,
and tests/test_layers.py checks every import against it.

- foundations: `errors` (which failures the user fixes, which a run cannot get
  past), `fs` (atomic writes, path containment), `layout` (the seed's
  folders), `lock` (one process per subject folder), `hub` (where models come from), `tiny_models` (offline models
  built from configs).
- check records: `checks` (each dataset check as one declared record: what it
  measures, how it judges, its words, its manifest columns, its settings) and
  `faces` (the face models they measure with). Below the settings, because the
  settings gather each check's own thresholds.
- settings: `settings` (each stage's settings), `config` (the training config
  and its presets).
- formats, the files other tools read or write: `config_io` (kohya_ss and
  CivitAI configs), `run_config` (a run's settings: preset, file, overrides),
  `batch` (a batch file of subjects, checked whole),
  `lora_io` (kohya's LoRA files), `manifest` (manifest.csv, its columns from
  the check records).
- data preparation: `sources` (reading an input safely), `decoding` (one photo
  to 8-bit RGB), `ingest` and `ingest_swap` (putting the new class folder in
  place with no kill losing a caption), `image_store`, `orientation` and `quality` (the
  `checks` and `crop` stages running the check records), `buckets`,
  `caption_text` (the caption rules), `blip` (the captioning model),
  `captioning`.
- models and training: `models` (the base model), `precision` (device and
  mixed precision), `network` (the LoRA layers), `train_data`, `conditioning`,
  `optim`, `training` (the step and the epoch loop), `run_state` (a run on
  disk), `metadata` (kohya's ss_* keys), `memory` (the out-of-memory ladder),
  `sampling`.
- evaluation: `run_folder` (the epoch files, and what selection writes back),
  `metric_grids` (the renders every epoch is judged on), `embedders`,
  `metrics` (the numbers), `selection` (the decision, and the resume rule).
"""

__all__ = [
    "LAYERS",
    "batch",
    "blip",
    "buckets",
    "caption_text",
    "captioning",
    "checks",
    "conditioning",
    "config",
    "config_io",
    "decoding",
    "embedders",
    "errors",
    "faces",
    "fs",
    "hub",
    "image_store",
    "ingest",
    "ingest_swap",
    "layout",
    "lock",
    "lora_io",
    "manifest",
    "memory",
    "metadata",
    "metric_grids",
    "metrics",
    "models",
    "network",
    "optim",
    "orientation",
    "precision",
    "quality",
    "run_config",
    "run_folder",
    "run_state",
    "sampling",
    "selection",
    "settings",
    "sources",
    "tiny_models",
    "train_data",
    "training",
]

# The layers from the bottom up: (name, modules). A package (a folder) is one entry; its modules are in its layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("errors", "fs", "layout", "lock", "hub", "tiny_models")),
    ("check records", ("faces", "checks")),
    ("settings", ("settings", "config")),
    ("formats", ("config_io", "run_config", "batch", "lora_io", "manifest")),
    (
        "data preparation",
        (
            "sources",
            "decoding",
            "ingest",
            "ingest_swap",
            "image_store",
            "orientation",
            "quality",
            "buckets",
            "caption_text",
            "blip",
            "captioning",
        ),
    ),
    (
        "models and training",
        (
            "models",
            "precision",
            "network",
            "train_data",
            "conditioning",
            "optim",
            "training",
            "run_state",
            "metadata",
            "memory",
            "sampling",
        ),
    ),
    ("evaluation", ("run_folder", "metric_grids", "embedders", "metrics", "selection")),
)
