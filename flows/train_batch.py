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
Failed only when every subject failed.
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed, State

from lora_core.setup.subjects import BatchSubject, load_batch, subject_outcome

__all__ = ["SUMMARY_KEY", "subject_deployment", "train_batch"]

SUMMARY_KEY = "train-batch-summary"
POLL_SECONDS = 5.0


@flow(name="train-batch")
def train_batch(batch_file: Path) -> State:
    """Train every subject of `batch_file` (YAML: `defaults:` and `subjects:`), one `train-subject` run each."""
    subjects = load_batch(batch_file)  # every problem of the file at once, before any run starts
    runs = [start_subject(subject) for subject in subjects]
    finished = wait_for(runs)
    rows = [summary_row(subject, finished[run.id]) for subject, run in zip(subjects, runs, strict=True)]
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


def wait_for(runs: list[FlowRun], poll: float = POLL_SECONDS) -> dict[UUID, FlowRun]:
    """Every run, once it reached a final state (Completed, Failed, Crashed, Cancelled)."""
    waiting, done = {run.id for run in runs}, {}
    with get_client(sync_client=True) as client:
        while waiting:
            for run_id in sorted(waiting):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    done[run_id] = run
                    waiting.discard(run_id)
            if waiting:
                time.sleep(poll)
    return done


def summary_row(subject: BatchSubject, run: FlowRun) -> dict:
    """One line of the summary: state, verdict, chosen epoch, LoRA, and the failure's message."""
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
        "message": "" if completed or state is None else (state.message or ""),
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
