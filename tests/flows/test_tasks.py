"""Task-level policy: which failures are retried, and that a retry really happens."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect import flow
from prefect.states import Completed, Failed

import tasks.ingest
from lora_core.config.lora_config import ConfigError
from lora_core.config.settings import IngestSettings
from lora_core.dataset.blip import CaptionModelError
from lora_core.dataset.ingest import TooFewImagesError
from lora_core.foundation.layout import SubjectLayout
from tasks.artifacts import artifact_key
from tasks.retries import retry_transient


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError("NFS hiccup"), True),
        (TimeoutError("slow disk"), True),
        (OSError(28, "No space left on device", "/work/x.bin"), False),  # a full disk stays full (ENOSPC)
        (TooFewImagesError("only 3", rows=[]), False),
        (ConfigError("bad.json: field 'x'"), False),
        (CaptionModelError("hub unreachable"), False),
        (TypeError("run_epoch() got an unexpected keyword argument"), False),
        (RuntimeError("CUDA error: an illegal memory access"), False),  # the context is poisoned: a new process
        (RuntimeError("CUDA error: out of resources (a passing one)"), True),
    ],
)
def test_only_transient_failures_are_retried(error, retried):
    assert retry_transient(None, None, Failed(data=error)) is retried


def test_a_completed_state_is_not_retried():
    assert retry_transient(None, None, Completed(data=1)) is False


def test_ingest_task_retries_a_transient_error(prefect_harness, good_folder, tmp_path, monkeypatch):
    real = tasks.ingest.ingest
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient read error")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.ingest, "ingest", flaky)

    @flow
    def once():
        task = tasks.ingest.ingest_photos.with_options(retry_delay_seconds=0, cache_policy=None, persist_result=False)
        return task(good_folder, SubjectLayout(tmp_path / "work", "t0k3n"), IngestSettings())

    assert once().accepted == 6
    assert len(calls) == 2


@pytest.mark.parametrize(("token", "key"), [("t0k3n", "t0k3n-ingest"), ("My_Token", "my-token-ingest")])
def test_artifact_keys_follow_the_token(token, key):
    assert artifact_key(token, "ingest") == key


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True))
def test_artifact_keys_are_valid_for_any_valid_token(token):
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key(token, "ingest-summary"))


def test_a_full_disk_while_prefect_writes_a_result_is_named_and_not_retried(
    prefect_harness, tmp_path, monkeypatch, caplog
):
    """Prefect persists a stage's record after its work, and logs a failed write with a traceback: a full disk
    there is said in our one line, the stage is not run again, its result is kept. A full disk inside a stage,
    in a write that is not ours, is our DiskFullError: exit 2, not retried."""
    import errno
    import logging
    from pathlib import Path

    from prefect.cache_policies import INPUTS

    from lora_core.foundation.errors import exit_code
    from lora_core.foundation.fs import DiskFullError
    from tasks.stage import stage, stage_results

    results, calls = tmp_path / "prefect-results", []

    @stage("toy", cache_policy=INPUTS)
    def toy(x: int) -> dict:
        calls.append(x)
        if x == 3:  # a library's own write, inside the stage
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.bin"))
        return {"x": x}

    @flow
    def run(x: int) -> dict:
        with stage_results(results):
            return toy.with_options(retry_delay_seconds=0)(x)

    with caplog.at_level(logging.INFO):
        assert run(1) == {"x": 1}
    (record,) = results.iterdir()  # written whole, under its own name: no temporary file left beside it
    assert json.loads(record.read_text())["result"] and not record.name.startswith(".")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # Prefect logs a failed write, no more
    caplog.clear()

    real_write = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.parent == results.resolve():  # the write of the record (to its temporary name) only
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with caplog.at_level(logging.INFO):
        assert run(2) == {"x": 2}  # the stage's result is kept
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert calls == [1, 2]  # run once: a full disk is not retried
    said = [r for r in caplog.records if "disk is full" in r.getMessage()]
    assert said and all(r.levelname == "WARNING" and r.exc_info is None for r in said), said
    assert f"could not write {results.resolve()}" in said[0].getMessage()
    assert list(results.iterdir()) == [record]  # no second record, whole or half, and no temporary file
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "prefect.task_runs"]

    with pytest.raises(DiskFullError) as caught:
        run(3)
    assert calls == [1, 2, 3] and exit_code(caught.value) == 2 and caught.value.stage == "toy"
    assert str(caught.value).startswith(f"the disk is full: could not write {tmp_path / 'model.bin'}")


def test_the_round_s_loss_chart_is_drawn_once_per_set_of_numbers(prefect_harness, monkeypatch):
    """A cached re-run publishes the same loss chart for its own run, without drawing it again; new numbers
    are drawn."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import tasks.artifacts

    drawn = []
    real = tasks.artifacts.loss_figure
    monkeypatch.setattr(tasks.artifacts, "loss_figure", lambda *a, **k: drawn.append(1) or real(*a, **k))

    @flow
    def round_of(losses: list[float]) -> None:
        progress = tasks.artifacts.TrainingProgress("ch4rt", 1, 2)
        progress.epoch_done(1, losses[:2], [1e-4, 1e-4])
        progress.epoch_done(2, losses[2:], [1e-4, 1e-4])
        progress.round_done()

    round_of([1.0, 0.9, 0.8, 0.7])
    round_of([1.0, 0.9, 0.8, 0.7])  # the cached re-run: the same numbers
    assert len(drawn) == 1
    round_of([1.0, 0.9, 0.8, 0.6])
    assert len(drawn) == 2
    with get_client(sync_client=True) as client:
        key = artifact_key("ch4rt", "training-loss")
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert len(versions) == 3 and all("data:image/png;base64," in v.data for v in versions)
    assert len({v.flow_run_id for v in versions}) == 3  # each run has its chart


def test_a_full_disk_without_a_file_name_says_no_path():
    """ENOSPC from a write() or flush() carries no file name: the message names none, rather than '.'."""
    import errno

    from lora_core.foundation.fs import DiskFullError, disk_full

    named = disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(named, DiskFullError) and str(named).startswith("the disk is full: a write failed;")
    assert disk_full(OSError(errno.EACCES, "Permission denied", "/x")) is None  # only a full disk
    assert disk_full(named) is named
