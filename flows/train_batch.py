"""Train several subjects in one go: the nightly batch, spread over every worker of the work pool.

    prefect deployment run train-batch/default --param batch_file=/shared/batches/tonight.yaml   # work pool
    prefect deployment run train-batch/local --param batch_file=tonight.yaml     # python -m deployments.serve

The batch file (`lora_core.setup.subjects`) is checked whole before anything starts.
Then each subject becomes its own `train-subject` run through the work pool
(`run_deployment`; the `train-subject` deployment beside the batch's own), so
the subjects spread over every worker that polls it and each shows under the
batch run on the dashboard; on each worker the GPU
stages take turns (`tasks.gpu`). A subject that fails never stops the others:
the batch waits for all, publishes the `train-batch-summary` table, and ends
Failed only when every subject failed. A subject running longer than its
`timeout_minutes` (default: no limit) is cancelled, and the table says so.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, Completed, Failed, State

from lora_core.setup.subjects import BatchSubject, load_batch, subject_outcome

__all__ = ["SUMMARY_KEY", "subject_deployment", "train_batch"]

SUMMARY_KEY = "train-batch-summary"
POLL_SECONDS = 5.0
CANCEL_GRACE_SECONDS = 120.0  # a cancelled run's worker stops it in seconds; one that is gone never does


@flow(name="train-batch")
def train_batch(batch_file: Path) -> State:
    """Train every subject of `batch_file` (YAML: `defaults:` and `subjects:`), one `train-subject` run each."""
    subjects = load_batch(batch_file)  # every problem of the file at once, before any run starts
    runs = [start_subject(subject) for subject in subjects]
    pairs = list(zip(subjects, runs, strict=True))
    finished, timed_out = wait_for(runs, {run.id: subject.timeout_minutes for subject, run in pairs})
    rows = [summary_row(subject, finished[run.id], run.id in timed_out) for subject, run in pairs]
    publish_summary(rows)
    return batch_state(rows)


def subject_deployment() -> str:
    """`train-subject/<name>` of the same name as this batch's deployment (train-batch/local ->
    train-subject/local): a served batch starts served subjects, a work pool's batch the pool's."""
    from prefect.runtime import deployment

    return f"train-subject/{deployment.name or 'default'}"


def start_subject(subject: BatchSubject) -> FlowRun:
    """A `train-subject` run of `subject`, shown under this batch run; returns at once."""
    run = run_deployment(
        subject_deployment(),
        parameters=subject.parameters(),
        flow_run_name=subject.token,
        timeout=0,
        as_subflow=True,
    )
    get_run_logger().info("batch: %s -> flow run %s (%s)", subject.token, run.name, run.id)
    return run


def wait_for(
    runs: list[FlowRun],
    limits: dict[UUID, float | None] | None = None,
    poll: float = POLL_SECONDS,
    grace: float = CANCEL_GRACE_SECONDS,
) -> tuple[dict[UUID, FlowRun], set[UUID]]:
    """Every run, once it reached a final state (Completed, Failed, Crashed, Cancelled); and those cancelled for
    their time.

    A run running longer than its limit (minutes, `timeout_minutes`; None: no limit) is cancelled: its worker
    stops the process. A run its worker never stops (the worker is gone) is marked Cancelled after `grace`.
    """
    limits = limits or {}
    waiting, done, cancelled = {run.id for run in runs}, {}, {}
    with get_client(sync_client=True) as client:
        while waiting:
            for run_id in sorted(waiting):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    done[run_id] = run
                    waiting.discard(run_id)
                elif run_id in cancelled and time.monotonic() - cancelled[run_id] > grace:
                    if run.state is not None and run.state.type == StateType.CANCELLING:  # still: nobody stops it
                        client.set_flow_run_state(run_id, Cancelled(message=run.state.message), force=True)
                elif run_id not in cancelled and overdue(run, limits.get(run_id), now=datetime.now(UTC)):
                    message = f"over its timeout_minutes ({limits[run_id]:g}): cancelled by the batch"
                    # Not forced, as `prefect flow-run cancel` does: a run that finished meanwhile stays finished.
                    if client.set_flow_run_state(run_id, Cancelling(message=message)).status == SetStateStatus.ACCEPT:
                        get_run_logger().warning("batch: %s %s", run.name, message)
                        cancelled[run_id] = time.monotonic()
            if waiting:
                time.sleep(poll)
    return done, set(cancelled)


def overdue(run: FlowRun, limit_minutes: float | None, now: datetime) -> bool:
    """Whether `run` has been running longer than `limit_minutes` (counted from its start, not from the time
    it waited for a worker)."""
    if limit_minutes is None or run.start_time is None or run.state is None or not run.state.is_running():
        return False
    return (now - run.start_time).total_seconds() > limit_minutes * 60


def summary_row(subject: BatchSubject, run: FlowRun, timed_out: bool = False) -> dict:
    """One line of the summary: state, verdict, chosen epoch, LoRA, and the failure's message (for a run cancelled
    for its time, that: the worker's own Cancelled message says only that it stopped)."""
    state = run.state
    completed = state is not None and state.is_completed()
    outcome = subject_outcome(subject) if completed else {"verdict": "", "chosen_epoch": None, "lora": ""}
    return {
        "subject": subject.token,
        "state": state.name if state else "unknown",
        "verdict": outcome["verdict"],
        "chosen_epoch": outcome["chosen_epoch"],
        "lora": outcome["lora"],
        "flow_run": run.name,
        "flow_run_id": str(run.id),
        "message": (
            f"over its timeout_minutes ({subject.timeout_minutes:g}): cancelled"
            if timed_out
            else ""
            if completed or state is None
            else (state.message or "")
        ),
    }


def publish_summary(rows: list[dict]) -> None:
    """The `train-batch-summary` table, and links to each subject's run for the dashboard."""
    create_table_artifact(key=SUMMARY_KEY, table=rows, description=_tally(rows))
    links = [
        f"- [{row['subject']}](/runs/flow-run/{row['flow_run_id']}): {row['state']}"
        + (f", {row['verdict']}, epoch {row['chosen_epoch']}: `{row['lora']}`" if row["verdict"] else "")
        + (f": {row['message']}" if row["message"] else "")
        for row in rows
    ]
    create_markdown_artifact(key=f"{SUMMARY_KEY}-runs", markdown=f"# {_tally(rows)}\n\n" + "\n".join(links) + "\n")


def _tally(rows: list[dict]) -> str:
    failed = [row["subject"] for row in rows if row["state"] != "Completed"]
    trained = f"{len(rows) - len(failed)} of {len(rows)} subject(s) trained"
    return trained + (f"; failed: {', '.join(failed)}" if failed else "")


def batch_state(rows: list[dict]) -> State:
    """Completed while any subject trained; Failed, naming each subject and why, when none did."""
    if any(row["state"] == "Completed" for row in rows):
        return Completed(message=_tally(rows))
    reasons = "; ".join(f"{row['subject']}: {row['state']} ({row['message'] or 'no message'})" for row in rows)
    return Failed(message=f"every subject failed: {reasons}")
