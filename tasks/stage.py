"""The one way to write a pipeline stage: a Prefect task that also knows whether its files are still whole.

A stage's cached result is only worth returning while the files it wrote are
on disk and unchanged, so each stage declares that check (`outputs_intact`,
called with the task's own arguments) next to the task, and calling the stage
decides `refresh_cache` from it. A flow then calls a stage like a function:

    with stage_results(layout.prefect_results) as cached:
        ingested = ingest_photos(photos, token, workdir, config.ingest, config.num_repeats)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import CachePolicy

from lora_core.foundation.errors import RunFailure, UserError
from lora_core.foundation.fs import disk_full
from tasks.gpu import gpu_slot
from tasks.result_files import result_files
from tasks.retries import retry_transient

P = ParamSpec("P")
R = TypeVar("R")


class _DiskFullRecord(logging.Filter):
    """Prefect writes a stage's result record after its work, and logs a failed write as an ERROR with a
    traceback; the task still completes. A full disk there is said in our one line instead, as a warning:
    the stage's files are whole, only its cache record is missing, so the next run does that stage again."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        committing = str(record.msg).startswith("An error was encountered while committing transaction")
        if committing and (named := disk_full(error)) is not None:
            record.msg, record.args, record.exc_info, record.exc_text = f"{named}", (), None, None
            record.msg += " (this stage's result is kept; only its cache record is missing: it runs again next time)"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("prefect.task_runs").addFilter(_DiskFullRecord())


@dataclass
class _Results:
    storage: Path
    cached: list[str] = field(default_factory=list)


_RESULTS: ContextVar[_Results | None] = ContextVar("stage_results", default=None)
_RUNNING: list[str] = []  # the stages this process is in, innermost last (for "stopped during ...")
_DONE: list[str] = []  # the last stage it finished


def running() -> str | None:
    """Where this process is: "during crop", "during epoch 2", "after epoch 1" (None before any stage)."""
    if _RUNNING:
        return f"during {_RUNNING[-1]}"
    return f"after {_DONE[-1]}" if _DONE else None


@contextmanager
def stage_results(storage: Path, cached: list[str] | None = None) -> Iterator[list[str]]:
    """Stages called inside keep their results in `storage` (so a cache hit survives the process);
    yields the list (`cached`, if given) of stage names answered from the cache, in call order."""
    results = _Results(Path(storage).resolve(), cached if cached is not None else [])
    token = _RESULTS.set(results)
    try:
        yield results.cached
    finally:
        _RESULTS.reset(token)


class Stage(Generic[P, R]):
    """A Prefect task plus the check that its outputs on disk are intact; calling it runs the task.

    A `gpu` stage runs holding a slot of the worker's GPU limit (`tasks.gpu`), taken before the task run
    starts, so its run's span on the dashboard is the GPU's time, not the wait for it.
    """

    def __init__(self, task: Task[P, R], outputs_intact: Callable[P, bool] | None = None, gpu: bool = False) -> None:
        self.task = task
        self.outputs_intact = outputs_intact
        self.gpu = gpu

    @property
    def name(self) -> str:
        return self.task.name

    def with_options(self, **options: Any) -> Stage[P, R]:
        return Stage(self.task.with_options(**options), self.outputs_intact, self.gpu)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        results = _RESULTS.get()
        options: dict[str, Any] = {}
        if self.outputs_intact is not None:
            options["refresh_cache"] = not self.outputs_intact(*args, **kwargs)
        if results is not None:
            options["result_storage"] = result_files(results.storage)
        label = self._label(args, kwargs)
        _RUNNING.append(label)
        try:
            with gpu_slot() if self.gpu else nullcontext():
                state = self.task.with_options(**options)(*args, return_state=True, **kwargs)
            if results is not None and state.name == "Cached":
                results.cached.append(self.name)
            return state.result()
        except (UserError, RunFailure) as err:
            err.stage = getattr(err, "stage", label)  # type: ignore[attr-defined]  # for the one-line message
            raise
        except OSError as err:
            # A write that is not ours inside the stage (a library's): a full disk is named as ours are.
            if (named := disk_full(err)) is None:
                raise
            named.stage = label  # type: ignore[attr-defined]
            raise named from err
        finally:
            _DONE[:] = [_RUNNING.pop()]

    def _label(self, args: tuple, kwargs: dict) -> str:
        """The stage's name, or "epoch N" for a stage that takes an epoch."""
        try:
            epoch = inspect.signature(self.task.fn).bind(*args, **kwargs).arguments.get("epoch")
        except TypeError:
            epoch = None
        return f"epoch {epoch}" if isinstance(epoch, int) else self.name


def stage(
    name: str, cache_policy: CachePolicy, outputs_intact: Callable[..., bool] | None = None, gpu: bool = False
) -> Callable[[Callable[P, R]], Stage[P, R]]:
    """Make a stage: a Prefect task whose JSON result persists, retried twice on transient failures
    and never on bad input (`tasks.retries`), refreshed whenever `outputs_intact(*args)` is False;
    a `gpu` stage holds the worker's GPU slot while it runs."""

    def decorate(fn: Callable[P, R]) -> Stage[P, R]:
        prefect_task = task(
            name=name,
            cache_policy=cache_policy,
            persist_result=True,
            result_serializer="json",
            retries=2,
            retry_delay_seconds=[2, 10],
            retry_condition_fn=retry_transient,
        )(fn)
        return Stage(prefect_task, outputs_intact, gpu)

    return decorate


def step(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A bookkeeping task between stages (start a run, publish its file): run every time, nothing
    cached, retried like a stage."""
    return task(name=name, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
