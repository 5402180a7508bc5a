"""The dashboard and the nightly batch on real services: a Prefect server (SQLite, then PostgreSQL), process
workers started as the README says, three subjects on the tiny models, and the UI in a headless browser."""

from __future__ import annotations

import itertools
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments import NIGHTLY_CRON, SERVED
from tests.integration.batch_scenario import (
    FEW,
    GOOD,
    GPU_STAGES,
    REPO,
    SCREENSHOTS,
    check_subjects,
    overlap,
    run_batch,
    timeline,
    verdict_of,
    wait_for_run,
)
from tests.integration.services import background, prefect_server, require_binaries

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """One machine: a server on SQLite, one worker running two subjects at once with one GPU slot."""
    require_binaries("taskset")
    folder = tmp_path_factory.mktemp("one-machine")
    with prefect_server(folder / "prefect-home") as server:
        yield run_batch(server, folder, ["box1"], subjects=2, cpus=["0-1"])


def test_one_machine_trains_the_batch_and_summarises_it(one_machine):
    check_subjects(one_machine)
    for token in GOOD:  # the dashboard: training progress reached its last epoch, the verdict is published
        assert one_machine.artifacts.get(f"{token}-selection")
        assert one_machine.artifacts[f"{token}-training-progress"] == 100  # epoch n of n


def test_one_gpu_job_at_a_time_while_other_stages_go_on(one_machine):
    outcome, tokens = one_machine, list(GOOD)
    gpu = {token: [span for stage in GPU_STAGES for span in outcome.spans(stage, token)] for token in tokens}
    training = {token: outcome.spans("train-epoch", token) for token in tokens}
    assert all(len(training[token]) >= 2 for token in tokens), training
    for a, b in itertools.combinations(tokens, 2):
        clashes = [(x, y) for x in gpu[a] for y in gpu[b] if overlap(x, y)]
        assert not clashes, f"GPU stages of {a} and {b} overlap under a limit of 1:\n{timeline(outcome)}"
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
    verdict = f"Verdict: {verdict_of(one_machine, token)}"
    ui = one_machine.server.ui_url.rstrip("/")
    shots = show_subject_verdict(ui, str(one_machine.batch.id), token, verdict, out, f"{token}-selection")
    assert all(shot.is_file() and shot.stat().st_size > 10_000 for shot in shots)


def test_the_nightly_schedule_is_declared_and_off(one_machine):
    with temporary_settings({PREFECT_API_URL: one_machine.server.api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train-batch/default")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON and not schedule.active
    assert deployment.parameters == {"batch_file": "deployments/nightly.yaml"}


def test_serve_runs_the_deployments_from_one_process(one_machine, tmp_path):
    """`python -m deployments.serve` on the same server as the work pool's: its own `local` deployments beside
    the pool's, its GPU limit, a subject run from the train-subject form's parameters, and a batch whose
    only subject fails: the batch starts it on the served deployment and ends Failed, naming it."""
    server, photos = one_machine.server, one_machine.folder / "photos"
    command = [sys.executable, "-m", "deployments.serve", "--worker-id", "solo", "--subjects", "2"]
    batch_file = tmp_path / "few.yaml"
    models = "{base_model: 'builtin:tiny-sd15', caption_model: 'builtin:tiny-blip'}"
    entry = f"{{photos: {photos / FEW}, token: f3w, workdir: {tmp_path / 'work'}}}"
    batch_file.write_text(f"defaults: {models}\nsubjects:\n  - {entry}\n")
    with (
        background(command, server.env, tmp_path / "serve.log", cwd=REPO),
        temporary_settings({PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        deadline, log = time.monotonic() + 180, tmp_path / "serve.log"
        while "Your deployments are being served" not in log.read_text():  # Prefect's words once it polls
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(2)
        subject = client.read_deployment_by_name(f"train-subject/{SERVED}")
        parameters = {"photos": str(photos / GOOD[0]), "token": "s0lo", "workdir": str(tmp_path / "work")}
        run = client.create_flow_run_from_deployment(subject.id, parameters={**parameters, "stop_after": "ingest"})
        batch = client.read_deployment_by_name(f"train-batch/{SERVED}")
        failing = client.create_flow_run_from_deployment(batch.id, parameters={"batch_file": str(batch_file)})
        run, failing = wait_for_run(client, run.id, tmp_path), wait_for_run(client, failing.id, tmp_path)
        assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
        assert client.read_global_concurrency_limit_by_name("gpu-solo").limit == 1
        (child,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[failing.id]))
        )
    assert (tmp_path / "work" / "s0lo" / "manifest.csv").is_file()
    assert child.deployment_id == subject.id and child.state.is_failed()
    assert failing.state.is_failed() and "every subject failed: f3w" in failing.state.message
    assert "at least 5" in failing.state.message
