"""The options every pipeline stage shares, so each stage module states only what differs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from tasks.retries import retry_transient


def stage(name: str, cache_policy: CachePolicy) -> Callable[[Callable[..., Any]], Any]:
    """A Prefect task whose JSON result persists (so a cache hit survives the process),
    retried twice on transient failures and never on bad input."""
    return task(
        name=name,
        cache_policy=cache_policy,
        persist_result=True,
        result_serializer="json",
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=retry_transient,
    )
