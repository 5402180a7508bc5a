"""One GPU job at a time per card, and the CPU shared fairly, when several subjects run on one machine.

A worker started by `python -m deployments.worker` (or `deployments.serve`)
names itself in `LORA_WORKER_ID` and says in `LORA_SUBJECTS` how many subjects
it runs at once; the flow runs it starts inherit both. Each GPU stage
(captioning, every training epoch, metric-grid and txt2img rendering) then
holds a slot of the Prefect global concurrency limit `gpu-<worker id>`, one
slot per card, for exactly the task's run: Prefect's own per-worker pattern
(docs: "Per-worker task concurrency"), coordinated by the server, so it holds
across the separate processes of the runs. Ingest, checks and bucketing of
other subjects go on meanwhile. Without a worker id (the command line, one
subject) no slot is taken.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

from lora_core.foundation.errors import UserError
from lora_core.training.precision import share_cores

__all__ = ["SUBJECTS_ENV", "WORKER_ID_ENV", "ensure_gpu_limit", "gpu_limit_name", "gpu_slot", "share_cpu"]

WORKER_ID_ENV = "LORA_WORKER_ID"
SUBJECTS_ENV = "LORA_SUBJECTS"


class WorkerIdError(UserError, ValueError):
    """A worker id that cannot name a concurrency limit."""


def gpu_limit_name(worker_id: str) -> str:
    """`gpu-<worker id>`: the limit of one worker's cards (letters, digits, '.', '_', '-' only)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", worker_id):
        raise WorkerIdError(f"worker id {worker_id!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    return f"gpu-{worker_id}"


@contextmanager
def gpu_slot() -> Iterator[str | None]:
    """Hold one slot of this worker's GPU limit while the body runs (yields its name; None: no worker id)."""
    worker_id = os.environ.get(WORKER_ID_ENV, "").strip()
    if not worker_id:
        yield None
        return
    name = gpu_limit_name(worker_id)
    # No timeout: another subject's epoch may take an hour. The lease is renewed while it is held.
    with concurrency(name, occupy=1):
        yield name


def share_cpu() -> int | None:
    """torch's thread count for this run: the cores divided by the subjects the worker runs at once."""
    subjects = os.environ.get(SUBJECTS_ENV, "").strip()
    return share_cores(int(subjects)) if subjects.isdigit() and int(subjects) > 0 else None


def ensure_gpu_limit(worker_id: str, slots: int) -> str:
    """Create (or resize) the worker's limit on the server `PREFECT_API_URL` names; returns its name."""
    from prefect.client.orchestration import get_client

    name = gpu_limit_name(worker_id)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)
    return name
