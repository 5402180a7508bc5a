"""A batch subject's `timeout_minutes`: a run over its time is cancelled, and the batch's summary says why."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Pending, Running

from flows.train_batch import overdue, summary_row, wait_for
from flows.train_subject import train_subject
from lora_core.setup.subjects import BatchError, BatchSubject, load_batch

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _run(state, started_minutes_ago: float | None) -> FlowRun:
    start = NOW - timedelta(minutes=started_minutes_ago) if started_minutes_ago is not None else None
    return FlowRun(flow_id=uuid4(), name="r", state=state, start_time=start)


@pytest.mark.parametrize(
    ("state", "ago", "limit", "over"),
    [
        (Running(), 31, 30, True),
        (Running(), 29, 30, False),
        (Running(), 600, None, False),  # no limit: never
        (Pending(), None, 30, False),  # waiting for a worker is not running
        (Completed(), 600, 30, False),  # done is done
    ],
)
def test_overdue_counts_from_the_run_s_start(state, ago, limit, over):
    assert overdue(_run(state, ago), limit, NOW) is over


def test_timeout_minutes_is_a_batch_key_checked_with_the_rest(tmp_path):
    (tmp_path / "p").mkdir()
    entry = {"photos": "p", "token": "t", "base_model": "builtin:tiny-sd15", "timeout_minutes": 0}
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({"subjects": [entry]}))
    with pytest.raises(BatchError, match="timeout_minutes"):
        load_batch(path)
    path.write_text(
        yaml.safe_dump({"defaults": {"timeout_minutes": 45}, "subjects": [entry | {"timeout_minutes": 2.5}]})
    )
    (subject,) = load_batch(path)
    assert subject.timeout_minutes == 2.5
    # The batch's own setting: train-subject is not given it (it has no such parameter).
    assert set(subject.parameters()) <= set(inspect.signature(train_subject.fn).parameters)


@flow
def _noop() -> None:
    pass


@flow
def _wait(ids: list[str], limits: list[float | None]) -> tuple[list[str], list[str]]:
    """wait_for inside a flow (it logs to the run), as the batch calls it; ids in and out, as a flow's
    parameters and result are no place for run objects (their states would be taken for the flow's)."""
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(UUID(run_id)) for run_id in ids]
    done, timed_out = wait_for(runs, {run.id: limit for run, limit in zip(runs, limits, strict=True)}, 0.2, 1.0)
    return sorted(map(str, done)), sorted(map(str, timed_out))


@pytest.mark.timeout(120)  # without the cancel, the wait never ends
def test_a_run_over_its_time_is_cancelled_and_reported(prefect_harness, tmp_path):
    """A run that runs past its limit is asked to cancel; with no worker to stop it, the batch marks it Cancelled
    after the grace. A run with no limit that finishes is left alone."""
    with get_client(sync_client=True) as client:
        slow = client.create_flow_run(_noop, state=Pending())
        quick = client.create_flow_run(_noop, state=Pending())
        for run in (slow, quick):
            client.set_flow_run_state(run.id, Running(), force=True)
        client.set_flow_run_state(quick.id, Completed(), force=True)
    done, timed_out = _wait([str(slow.id), str(quick.id)], [0.0001, None])
    assert done == sorted([str(slow.id), str(quick.id)]) and timed_out == [str(slow.id)]
    with get_client(sync_client=True) as client:
        slow, quick = client.read_flow_run(slow.id), client.read_flow_run(quick.id)
    assert slow.state.is_cancelled() and quick.state.is_completed()
    assert "over its timeout_minutes" in slow.state.message  # the Cancelling's reason, kept by the forced end
    subject = BatchSubject(photos=Path(tmp_path), token="sl0w", timeout_minutes=0.0001)
    row = summary_row(subject, slow, timed_out=True)
    assert row["state"] == "Cancelled" and row["message"] == "over its timeout_minutes (0.0001): cancelled"
