"""Prefect tasks: thin wrappers over `lora_core` that add caching, retries, logging and artifacts."""

from tasks.ingest import ingest_photos

__all__ = ["ingest_photos"]
