"""Task-level policy: which failures are retried, and that a retry really happens."""

from __future__ import annotations

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
