"""Runs a kill left behind: a process killed with -9 (or a machine that lost power) never tells Prefect its
run ended, so the run stays RUNNING in the database, and in the UI, for ever.

The next run of the same subject holds the subject's lock, so no other process can be running it: every
earlier run of that subject still marked RUNNING is one of those, and is marked Crashed, saying why.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from lora_core.foundation.layout import SubjectLayout

__all__ = ["crash_orphaned_runs"]

# RUNNING only: a PENDING run may be one a worker is starting now, which will wait for the lock.
_STILL_GOING = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))


def _same_subject(parameters: dict, layout: SubjectLayout) -> bool:
    workdir = parameters.get("workdir", "work")
    try:
        return Path(str(workdir)).expanduser().resolve() == layout.workdir.resolve()
    except OSError:
        return False


def crash_orphaned_runs(layout: SubjectLayout) -> int:
    """Mark this subject's earlier runs (and their tasks) that are still RUNNING as Crashed; how many.

    Call it holding the subject's lock: that is what proves they are not running.
    """
    me = flow_run.id
    message = (
        f"this run of {layout.token} stopped without a word (killed, or its machine went down); "
        "a later run of the subject found it still marked running"
    )
    crashed = 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[layout.token]), state=_STILL_GOING)
        )
        for run in runs:
            if str(run.id) == str(me) or not _same_subject(run.parameters, layout):
                continue
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            )
            for task in tasks:
                if task.state is not None and task.state.type == StateType.RUNNING:
                    client.set_task_run_state(task.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed += 1
    return crashed
