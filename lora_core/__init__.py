"""The pure library behind the pipeline: no Prefect here, so every stage is testable alone.

One module per concept: `config` (the settings), `layout` (the seed's folders),
`sources` (reading an input safely), `ingest`, `manifest`, `buckets`, `captioning`,
`tiny_models` (offline models built from configs), `fs` (atomic writes).
"""

__all__ = ["buckets", "captioning", "config", "fs", "ingest", "layout", "manifest", "sources", "tiny_models"]
