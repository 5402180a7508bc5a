"""Per-photo work on every core this process may use: ingest's decoding, the check stages' face work.

Ingest decodes on threads: Pillow releases the GIL while it decodes, resizes
and compresses PNG, and `bench.ingest_speed` measured threads and processes at
the same speed-up on 2 cores. The checks cannot: dlib's face models hold the
GIL while they run (two threads measured 1.06x one), so their photos go to
worker processes. These come from a fork server (`multiprocessing`'s
"forkserver"), never from a fork of this process: here Prefect's threads
(its API client, its log and event senders) run, and a fork beside threads
can copy a lock one of them holds, which the child then waits on forever.
The fork server is a fresh interpreter (no Prefect, no stage code running) with
the work's module imported once;
each pool's workers fork from it and get the work (a module-level function,
or a partial of one, with picklable arguments; the face models pickle as "this
process's own", loaded once per worker) when they start. Only each photo's
item (a path) and its small result are pickled after that. Results are placed
by index, so a parallel run writes exactly what a sequential one does. Off Linux
(untested there) process work runs here, one photo after another.

How many workers: the cores this process may run on (`os.sched_getaffinity`:
taskset, cpusets), and no more than torch's thread count once torch is loaded,
which is how `lora_core.training.precision.share_cores` gives each of several subjects
on one machine its share.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from rich.progress import Progress

from lora_core.foundation.fs import JsonCache, sha256_file

__all__ = ["MIN_PHOTOS_PER_WORKER", "OnPhoto", "analyse_photos", "photo_workers", "run_per_photo", "usable_cores"]

OnPhoto = Callable[[str, int, int], None]  # (photo's name, photos done, photos in all), called as each is done

T = TypeVar("T")
R = TypeVar("R")

MIN_PHOTOS_PER_WORKER = 2  # fewer photos than this per extra worker: the fork is not worth it
IN_FLIGHT_PER_WORKER = 2  # items handed out ahead: a worker never waits, and few files' bytes are held
_JOBS: dict[int, Callable[[Any], Any]] = {}  # the work forked workers inherit, by job
_JOB_IDS = itertools.count()


def usable_cores() -> int:
    """The cores this process may use, capped by torch's thread share when torch is loaded."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    torch = sys.modules.get("torch")
    if torch is not None:
        cores = min(cores, torch.get_num_threads())
    return max(1, cores)


def photo_workers(photos: int, workers: int | None = None) -> int:
    """How many workers `photos` photos get: `workers` (default: every usable core), never more than pay off."""
    wanted = workers if workers is not None else usable_cores()
    return max(1, min(wanted, photos // MIN_PHOTOS_PER_WORKER or 1))


def _can_use_processes() -> bool:
    """Linux (its fork server is tested here; elsewhere the work runs in this process), and not itself a
    daemonic worker (which may not start processes)."""
    linux = sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()
    return linux and not multiprocessing.current_process().daemon


@contextmanager
def _plain_main() -> Iterator[None]:
    """`__main__` as an empty module while the pool starts its workers. A worker runs the parent's main module
    again (multiprocessing does, for work defined there); ours is the command line's
    (`python -m flows.train_subject`), whose imports (torch, Prefect, every stage) a worker does not need:
    3.3 s and hundreds of MB each. The work is never in `__main__`: it is pickled by its module's name."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _process_context(work: Callable[[Any], Any]) -> multiprocessing.context.BaseContext:
    """The fork server's context; when it is not running yet, it will import `work`'s module once, so that
    every worker forked from it has it (not `__main__`: that would start the command line's imports again)."""
    context = multiprocessing.get_context("forkserver")
    function = getattr(work, "func", work)  # a partial's function
    module = getattr(function, "__module__", None)
    if module and module != "__main__":
        context.set_forkserver_preload([module])
    return context


def _install(job: int, work: Callable[[Any], Any]) -> None:
    """A worker's start: the job's work, unpickled once."""
    _JOBS[job] = work


def _run_one(job: int, item: Any) -> Any:
    return _JOBS[job](item)


def run_per_photo(
    work: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    *,
    count: int | None = None,
    threads: bool = False,
) -> Iterator[tuple[int, R]]:
    """Yield `(index, work(item))` for every item as each finishes, on `photo_workers` workers.

    `items` is taken lazily, here, a few ahead of the workers, so a generator
    that reads files keeps only those in memory (give `count`, how many there
    may be, for a generator). On `threads` for work that releases the GIL;
    otherwise on the fork server's processes: `work`, items and results must
    pickle (a module-level function or a partial of one; not a closure). An
    exception in `work` is raised here, and the items not yet started are cancelled.
    """
    total = count if count is not None else len(items)  # type: ignore[arg-type]
    count = photo_workers(total, workers)
    if count < 2 or not (threads or _can_use_processes()):
        for index, item in enumerate(items):
            yield index, work(item)
        return
    job = next(_JOB_IDS)
    _JOBS[job] = work  # for the threads; the processes get it pickled, once each, as they start
    pool: Executor = (
        ThreadPoolExecutor(count, thread_name_prefix="photo")
        if threads
        else ProcessPoolExecutor(count, mp_context=_process_context(work), initializer=_install, initargs=(job, work))
    )
    ahead = enumerate(items)
    pending: dict[Future, int] = {}
    try:
        while True:
            with nullcontext() if threads else _plain_main():  # a submit may start a worker process
                for index, item in itertools.islice(ahead, IN_FLIGHT_PER_WORKER * count - len(pending)):
                    pending[pool.submit(_run_one, job, item)] = index
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield pending.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        del _JOBS[job]


def analyse_photos(
    work: Callable[[Path], dict],
    photos: Sequence[tuple[str, Path]],
    cache: JsonCache,
    *,
    label: str,
    show_progress: bool = True,
    on_photo: OnPhoto | None = None,
    workers: int | None = None,
) -> list[dict]:
    """`work(path)` of every `(name, path)` photo, in order: from `cache` by the file's content where it
    is there, the rest on the workers; each photo reported (a progress bar, `on_photo`) as it is done."""
    shas = [sha256_file(path) for _, path in photos]
    results: list[Any] = [cache.get(sha) for sha in shas]
    todo = [index for index, result in enumerate(results) if result is None]
    done = len(photos) - len(todo)
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task(label, total=len(photos), completed=done)
        if on_photo is not None:
            cached = [name for index, (name, _) in enumerate(photos) if results[index] is not None]
            for count, name in enumerate(cached, start=1):
                on_photo(name, count, len(photos))
        for position, result in run_per_photo(work, [photos[index][1] for index in todo], workers):
            index = todo[position]
            results[index] = result
            cache.put(shas[index], result)
            done += 1
            progress.update(bar, advance=1, description=f"{label}: {photos[index][0]}")
            if on_photo is not None:
                on_photo(photos[index][0], done, len(photos))
    return results
