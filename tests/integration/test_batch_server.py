"""The dashboard and the nightly batch on real services: a Prefect server (SQLite, then PostgreSQL), process
workers started as the README says, three subjects on the tiny models, and the UI in a headless browser."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.batch_scenario import (
    FEW,
    GOOD,
    GPU_STAGES,
    BatchOutcome,
    overlap,
    run_batch,
    timeline,
    verdict_of,
)
from tests.integration.services import postgres, prefect_server, require_binaries

pytestmark = pytest.mark.integration

SCREENSHOTS = Path(os.environ.get("LORA_SCREENSHOTS", "")) if os.environ.get("LORA_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """One machine: a server on SQLite, one worker running two subjects at once with one GPU slot."""
    require_binaries("taskset")
    folder = tmp_path_factory.mktemp("one-machine")
    with prefect_server(folder / "prefect-home") as server:
        yield run_batch(server, folder, ["box1"], subjects=2, cpus=["0-1"])


def _check_subjects(outcome: BatchOutcome) -> None:
    assert outcome.batch.state.is_completed(), outcome.batch.state
    assert sorted(outcome.subjects) == sorted([*GOOD, FEW])
    for token in GOOD:
        run = outcome.subjects[token]
        assert run.state.is_completed(), (token, run.state)
        result = outcome.folder / "work" / token / "result_current"
        assert (result / "selection.json").is_file() and (result / f"{token}.safetensors").is_file()
    failed = outcome.subjects[FEW].state
    assert failed.is_failed() and "at least 5" in (failed.message or ""), failed
    rows = {row["subject"]: row for row in outcome.summary}
    assert set(rows) == {*GOOD, FEW}
    for token in GOOD:
        row = rows[token]
        assert row["state"] == "Completed" and row["verdict"] == verdict_of(outcome, token)
        assert row["chosen_epoch"] >= 1 and Path(row["lora"]).is_file()
    assert rows[FEW]["state"] == "Failed" and "at least 5" in rows[FEW]["message"]
    assert "2 of 3" in (outcome.batch.state.message or "") and FEW in outcome.batch.state.message


def test_one_machine_trains_the_batch_and_summarises_it(one_machine):
    _check_subjects(one_machine)
    for token in GOOD:  # the dashboard: training progress reached its last epoch, the verdict is published
        assert one_machine.artifacts.get(f"{token}-selection")
        assert f"{token}-training-progress" in one_machine.artifacts


def test_one_gpu_job_at_a_time_while_other_stages_go_on(one_machine):
    outcome, tokens = one_machine, list(GOOD)
    gpu = {token: [span for stage in GPU_STAGES for span in outcome.spans(stage, token)] for token in tokens}
    training = {token: outcome.spans("train-epoch", token) for token in tokens}
    assert all(len(training[token]) >= 2 for token in tokens), training
    for a, b in itertools.combinations(tokens, 2):
        clashes = [(x, y) for x in gpu[a] for y in gpu[b] if overlap(x, y)]
        assert not clashes, f"GPU stages of {a} and {b} overlap under a limit of 1: {clashes}"
    ingest_during_training = [
        (other, token)
        for token in tokens
        for other in [*tokens, FEW]
        if other != token
        for ingest in outcome.spans("ingest", other)
        if any(overlap(ingest, span) for span in training[token])
    ]
    assert ingest_during_training, f"no subject's ingest ran while another subject trained:\n{timeline(outcome)}"


def test_the_browser_finds_the_verdict_under_the_batch_run(one_machine, tmp_path):
    require_binaries("chromium", "chromedriver")
    from tests.integration.browser import show_subject_verdict

    token = GOOD[0]
    out = SCREENSHOTS or tmp_path
    shots = show_subject_verdict(
        one_machine.server.ui_url.rstrip("/"), str(one_machine.batch.id), token, verdict_of(one_machine, token), out
    )
    assert all(shot.is_file() and shot.stat().st_size > 10_000 for shot in shots)


def test_several_machines_on_postgres(tmp_path):
    """Two workers, each a 'machine' of its own (one core, its own gpu-<id> limit), one server on PostgreSQL."""
    require_binaries("initdb", "pg_ctl", "taskset")
    with postgres(tmp_path / "pg") as url, prefect_server(tmp_path / "prefect-home", database_url=url) as server:
        outcome = run_batch(server, tmp_path, ["box-a", "box-b"], subjects=1, cpus=["0", "1"])
    _check_subjects(outcome)
    by_worker = {token: outcome.worker_of(token) for token in outcome.subjects}
    assert set(by_worker.values()) == {"box-a", "box-b"}, by_worker
    for a, b in itertools.combinations(GOOD, 2):
        if by_worker[a] == by_worker[b]:
            clashes = [
                (x, y)
                for x in outcome.spans("train-epoch", a)
                for y in outcome.spans("train-epoch", b)
                if overlap(x, y)
            ]
            assert not clashes, f"{a} and {b} trained at once on {by_worker[a]}: {clashes}"
    if SCREENSHOTS:
        shutil.copytree(outcome.logs, SCREENSHOTS / "postgres-logs", dirs_exist_ok=True)
