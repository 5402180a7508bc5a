"""The clocks inside a process of `bench.rerun`: a probed re-run of the demo command, and the bare Prefect flow.

`python -m bench.rerun` starts these (`_probe`, `_bare`) and reads the JSON they write.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0_ENV = "BENCH_RERUN_T0"  # the parent's clock just before it starts a process (time.time(), same machine)


class Clock:
    """Spans (kind, name, start, end) in time.time() seconds, and named marks."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def wrap(self, kind: str, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        import functools

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            try:
                label = name(*args, **kwargs) if callable(name) else name
            except Exception:  # a clock never breaks what it times
                label = "?"
            span = {"kind": kind, "name": label, "start": time.time()}
            self.spans.append(span)
            try:
                return fn(*args, **kwargs)
            finally:
                span["end"] = time.time()

        return timed


def _key_task(policy: Any, *args: Any, **kwargs: Any) -> str:
    """The task a cache policy's `compute_key(task_ctx, inputs, flow_parameters)` is for."""
    ctx = kwargs.get("task_ctx", args[0] if args else None)
    return ctx.task.name if ctx is not None else "?"


def _install_clocks(clock: Clock) -> None:
    """Clocks on Prefect's temporary server, the flow's body, every task call, our cache keys, our outputs
    checks and the task bodies that run. No task's own function is touched: the cache keys stay the same."""
    from prefect.cache_policies import CachePolicy, CompoundCachePolicy
    from prefect.flow_engine import FlowRunEngine
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.task_engine import SyncTaskRunEngine
    from prefect.tasks import Task

    from tasks.stage import Stage

    SubprocessASGIServer.start = clock.wrap("server", "temporary server start", SubprocessASGIServer.start)
    # the task's body, run (a step, a cache miss), with Prefect's handling of its result; the task's own fn
    # is left alone (a wrapped fn changes what Prefect stores with the task)
    SyncTaskRunEngine.call_task_fn = clock.wrap(
        "body", lambda engine, *a, **k: engine.task.name, SyncTaskRunEngine.call_task_fn
    )
    FlowRunEngine.call_flow_fn = clock.wrap("flow", lambda engine: engine.flow.name, FlowRunEngine.call_flow_fn)
    Task.__call__ = clock.wrap("task", lambda task, *a, **k: task.name, Task.__call__)
    CompoundCachePolicy.compute_key = clock.wrap("key-all", _key_task, CompoundCachePolicy.compute_key)
    for name, module in list(sys.modules.items()):
        if not (name.startswith(("tasks.", "flows.")) and module is not None):
            continue
        for value in list(vars(module).values()):
            ours = isinstance(value, type) and issubclass(value, CachePolicy) and value.__module__ == name
            if ours and "compute_key" in vars(value) and not hasattr(value.compute_key, "__wrapped__"):
                value.compute_key = clock.wrap(
                    "key-ours",
                    _key_task,
                    value.compute_key,
                )
            if isinstance(value, Stage) and value.outputs_intact and not hasattr(value.outputs_intact, "__wrapped__"):
                value.outputs_intact = clock.wrap("intact", value.name, value.outputs_intact)


def probe(out: Path, argv: list[str]) -> int:
    """Run the command line (`flows.cli.main(argv)`) with clocks; write them to `out` as JSON."""
    clock = Clock()
    clock.marks["t0"] = float(os.environ.get(T0_ENV, time.time()))
    clock.mark("entered")
    import flows.cli as cli

    clock.mark("cli_imported")
    check_args, run = cli.check_args, cli._run

    def timed_check(args: argparse.Namespace) -> Any:
        clock.mark("check_start")
        try:
            return check_args(args)
        finally:
            clock.mark("check_end")

    def timed_run(args: argparse.Namespace, config: Any) -> dict:
        clock.mark("import_start")
        import flows.train_subject  # noqa: F401  # what _run imports first: Prefect, torch, diffusers, ...

        clock.mark("import_end")
        _install_clocks(clock)  # imports Prefect's server and engine modules, which a plain run imports later
        clock.mark("flow_start")
        try:
            summary = run(args, config)
        finally:
            clock.mark("flow_end")
        clock.marks["summary"] = {"cached": summary.get("cached", []), "stages": sorted(summary)}  # type: ignore[assignment]
        return summary

    cli.check_args, cli._run = timed_check, timed_run
    console = sys.modules["flows.console"]
    console.quiet_library_bars = clock.wrap("bars", "quiet_library_bars", console.quiet_library_bars)
    code = cli.main(argv)
    clock.mark("main_end")
    out.write_text(json.dumps({"code": code, "marks": clock.marks, "spans": clock.spans}))
    return code


def bare_flow(tasks: int, storage: Path, out: Path) -> int:
    """The plain reference: a Prefect flow of `tasks` no-op tasks with persisted, cached JSON results."""
    clock = Clock()
    clock.marks["t0"] = float(os.environ.get(T0_ENV, time.time()))
    clock.mark("entered")
    clock.mark("import_start")
    from prefect import flow, task
    from prefect.cache_policies import INPUTS
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.tasks import Task

    clock.mark("import_end")
    SubprocessASGIServer.start = clock.wrap("server", "temporary server start", SubprocessASGIServer.start)
    Task.__call__ = clock.wrap("task", lambda t, *a, **k: t.name, Task.__call__)

    @task(name="noop", cache_policy=INPUTS, persist_result=True, result_serializer="json", result_storage=storage)
    def noop(i: int) -> dict:
        return {"i": i}

    @flow(name="bare-rerun")
    def plain(n: int) -> list[dict]:
        return [noop(i) for i in range(n)]

    clock.mark("flow_start")
    plain(tasks)
    clock.mark("flow_end")
    clock.mark("main_end")
    out.write_text(json.dumps({"code": 0, "marks": clock.marks, "spans": clock.spans}))
    return 0
