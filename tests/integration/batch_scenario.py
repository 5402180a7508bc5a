"""The nightly batch on a real Prefect server, as a user sets it up: pool, `prefect deploy --all`, workers.

Three subjects on the built-in tiny models: two with the demo's six photos,
one with three (it must fail with the "at least 5" message without stopping
the others). The runs, their task runs' spans and the artifacts are read back
through the Prefect client for the tests to judge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import yaml
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments import SUBJECT_DEPLOYMENT
from lora_core.setup.subjects import load_batch
from tests.integration.services import PrefectServer, background, log_tail

REPO = Path(__file__).resolve().parents[2]
DEMO_PHOTOS = REPO / "demo" / "photos"
GOOD, FEW = ("ann4", "b3n"), "cl3o"
GPU_STAGES = ("captions", "train-epoch", "samples", "txt2img")
BATCH_TIMEOUT = 1200
# Where the tests leave their screenshots and logs for a person to look at (default: pytest's tmp folders).
SCREENSHOTS = Path(os.environ["LORA_SCREENSHOTS"]) if os.environ.get("LORA_SCREENSHOTS") else None


def write_batch(folder: Path) -> Path:
    """Subjects ann4 and b3n (the demo's six photos each) and cl3o (three phone photos), in that order, on the
    tiny models. A worker running two subjects at once starts b3n once cl3o failed, after ingesting its three
    12 MP photos, while ann4 (prepared: its stages up to captions cached) is training."""
    for token in GOOD:
        shutil.copytree(DEMO_PHOTOS, folder / "photos" / token)
    (folder / "photos" / FEW).mkdir(parents=True)
    for photo in sorted(DEMO_PHOTOS.glob("*.jpg"))[:3]:  # three 12-megapixel phone photos
        with Image.open(photo) as image:
            image.convert("RGB").resize((4000, 3000)).save(folder / "photos" / FEW / photo.name, quality=90)
    batch = {
        "defaults": {
            "workdir": "work",
            "config": str(REPO / "demo" / "config.json"),
            "base_model": "builtin:tiny-sd15",
            "caption_model": "builtin:tiny-blip",
            "overrides": {
                "max_train_epochs": 2,
                "sample_every_n_epochs": 0,
                "selection": {"max_resumes": 0, "strengths": [1.0]},
            },
        },
        "subjects": [
            {"photos": "photos/ann4", "token": "ann4", "overrides": {"max_train_epochs": 3}},
            {"photos": f"photos/{FEW}", "token": FEW},
            {"photos": "photos/b3n", "token": "b3n"},
        ],
    }
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump(batch), encoding="utf-8")
    return path


def prefect_cli(server: PrefectServer, *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env={**server.env, "PWD": str(REPO)},  # prefect.yaml's pull step: this checkout
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def workers(server: PrefectServer, logs: Path, ids: list[str], subjects: int, cpus: list[str]) -> Iterator[None]:
    """`python -m deployments.worker` per id, each pinned to its CPUs (a machine of its own)."""
    env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    with ExitStack() as stack:
        for worker_id, cpu in zip(ids, cpus, strict=True):
            command = ["taskset", "-c", cpu, sys.executable, "-m", "deployments.worker", "--pool", "lora-gpu"]
            command += ["--worker-id", worker_id, "--subjects", str(subjects), "--gpus", "1"]
            stack.enter_context(background(command, env, logs / f"worker-{worker_id}.log", cwd=REPO))
        yield


@dataclass
class BatchOutcome:
    """What the batch did, read back from the server."""

    server: PrefectServer
    folder: Path
    logs: Path
    batch: FlowRun
    subjects: dict[str, FlowRun]  # by token
    task_runs: dict[str, list[TaskRun]]  # by token
    summary: list[dict]
    artifacts: dict[str, object] = field(default_factory=dict)  # key -> data, of the subject runs

    def spans(self, stage: str, token: str) -> list[tuple[float, float]]:
        return [
            (run.start_time.timestamp(), run.end_time.timestamp())
            for run in self.task_runs[token]
            if run.name.startswith(f"{stage}-") and run.start_time and run.end_time
        ]

    def worker_of(self, token: str) -> str:
        """The worker that ran the token's run: its log says it submitted it and the server did not abort that
        (two workers may both try; the server lets one have it)."""
        run_id = self.subjects[token].id
        workers = []
        for log in self.logs.glob("worker-*.log"):
            text = log.read_text(errors="replace")
            if f"submitting flow run '{run_id}'" in text and f"Aborted submission of flow run '{run_id}'" not in text:
                workers.append(log.stem.removeprefix("worker-"))
        assert len(workers) == 1, f"{token}'s run {run_id} was run by {workers}"
        return workers[0]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def run_batch(
    server: PrefectServer, folder: Path, worker_ids: list[str], subjects: int, cpus: list[str]
) -> BatchOutcome:
    """Pool, deployments, workers; trigger train-batch on the batch file; wait; read everything back."""
    logs = folder / "logs"
    batch_file = write_batch(folder)
    prefect_cli(server, "work-pool", "create", "lora-gpu", "--type", "process")
    prefect_cli(server, "--no-prompt", "deploy", "--all")
    with (
        workers(server, logs, worker_ids, subjects, cpus),
        temporary_settings({PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        _prepare(client, batch_file, GOOD[0], logs)
        deployment = client.read_deployment_by_name("train-batch/default")
        batch = client.create_flow_run_from_deployment(deployment.id, parameters={"batch_file": str(batch_file)})
        batch = wait_for_run(client, batch.id, logs)
        return _read_back(client, server, folder, logs, batch)


def _prepare(client, batch_file: Path, token: str, logs: Path) -> None:
    """The seed's habit: look at a subject's crops and captions before training it. `token`'s run stops after
    captions; in the batch its first stages are then cached and it trains at once, while the others ingest."""
    (subject,) = [s for s in load_batch(batch_file) if s.token == token]
    deployment = client.read_deployment_by_name(SUBJECT_DEPLOYMENT)
    parameters = {**subject.parameters(), "stop_after": "captions"}
    run = wait_for_run(client, client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id, logs)
    assert run.state.is_completed(), f"preparing {token}: {run.state}"


def timeline(outcome: BatchOutcome) -> str:
    """Every task run of every subject, by start time: what a failed timing assertion shows."""
    rows = sorted(
        (run.start_time.timestamp(), run.end_time.timestamp(), token, run.name)
        for token, runs in outcome.task_runs.items()
        for run in runs
        if run.start_time and run.end_time
    )
    first = rows[0][0] if rows else 0.0
    return "\n".join(f"{start - first:7.1f} {end - first:7.1f}  {token:6} {name}" for start, end, token, name in rows)


def wait_for_run(client, run_id: UUID, logs: Path) -> FlowRun:
    deadline = time.monotonic() + BATCH_TIMEOUT
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(3)
    tails = "\n".join(f"--- {log.name}\n{log_tail(log, 60)}" for log in sorted(logs.glob("*.log")))
    raise AssertionError(f"train-batch did not finish in {BATCH_TIMEOUT} s:\n{tails}")


def _read_back(client, server: PrefectServer, folder: Path, logs: Path, batch: FlowRun) -> BatchOutcome:
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[batch.id]))
    )
    subjects = {run.parameters["token"]: run for run in children}
    task_runs: dict[str, list[TaskRun]] = {}
    for token, run in subjects.items():
        task_runs[token] = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    summary_artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-batch-summary"]))
    )
    summary = json.loads(summary_artifacts[0].data) if summary_artifacts else []
    keys = [f"{token}-training-progress" for token in subjects] + [f"{token}-selection" for token in subjects]
    artifacts = {
        a.key: a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    }
    outcome = BatchOutcome(server, folder, logs, batch, subjects, task_runs, summary, artifacts)
    (logs / "timeline.txt").write_text(timeline(outcome), encoding="utf-8")
    return outcome


def verdict_of(outcome: BatchOutcome, token: str) -> str:
    record = json.loads((outcome.folder / "work" / token / "result_current" / "selection.json").read_text())
    return record["verdict"]


def message_mentions(text: str, *words: str) -> bool:
    return all(re.search(re.escape(word), text) for word in words)


def check_subjects(outcome: BatchOutcome) -> None:
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
