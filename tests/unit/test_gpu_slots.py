"""Several subjects on one worker: GPU stages take the worker's slot, each run keeps its own models, the CPU
is shared; the batch's end state (tasks.gpu, tasks.stage, deployments, flows.train_batch)."""

from __future__ import annotations

import argparse

import pytest
import torch
from prefect import flow
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

import tasks.select
import tasks.train
from deployments.machine import prepare_machine
from deployments.worker import worker_command
from flows.train_batch import batch_state
from lora_core.training.precision import share_cores
from tasks.gpu import SUBJECTS_ENV, WORKER_ID_ENV, WorkerIdError, gpu_limit_name, gpu_slot, share_cpu
from tasks.stage import stage


def _active(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


@stage("gpu-probe", NO_CACHE, gpu=True)
def _gpu_probe(name: str) -> int:
    return _active(name)


@stage("cpu-probe", NO_CACHE)
def _cpu_probe(name: str) -> int:
    return _active(name)


@pytest.fixture
def machine(prefect_harness, monkeypatch) -> str:
    """This test process as worker `unit-box` with two subjects at once and one GPU slot."""
    for name in (WORKER_ID_ENV, SUBJECTS_ENV):
        monkeypatch.setenv(name, "")  # restored (unset) after the test, though prepare_machine sets them
    threads = torch.get_num_threads()
    args = argparse.Namespace(worker_id="unit-box", gpus=1, subjects=2)
    yield prepare_machine(args)
    torch.set_num_threads(threads)


def test_a_gpu_stage_holds_the_worker_slot_only_while_it_runs(machine):
    assert machine == "gpu-unit-box"

    @flow
    def probe() -> tuple[int, int]:
        return _gpu_probe(machine), _cpu_probe(machine)

    assert probe() == (1, 0)
    assert _active(machine) == 0


def test_no_worker_id_takes_no_slot(monkeypatch):
    monkeypatch.delenv(WORKER_ID_ENV, raising=False)
    with gpu_slot() as name:
        assert name is None


@pytest.mark.parametrize("worker_id", ["", "box/1", "a b", "-x", "x" * 64])
def test_a_worker_id_that_cannot_name_a_limit_is_refused(worker_id):
    with pytest.raises(WorkerIdError):
        gpu_limit_name(worker_id)


def test_the_worker_starts_prefect_with_a_run_slot_for_the_batch():
    command = worker_command(argparse.Namespace(pool="lora-gpu", worker_id="box1", subjects=3))
    assert command[-8:] == ["--pool", "lora-gpu", "--type", "process", "--name", "box1", "--limit", "4"]


@pytest.mark.parametrize(("subjects", "cores", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 8, 4), (3, 8, 2)])
def test_subjects_share_the_cores(subjects, cores, threads):
    before = torch.get_num_threads()
    try:
        assert share_cores(subjects, cores) == threads
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_worker_s_runs_take_their_share(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(SUBJECTS_ENV, raising=False)
        assert share_cpu() is None and torch.get_num_threads() == before
        monkeypatch.setenv(SUBJECTS_ENV, "64")
        assert share_cpu() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_releasing_one_run_keeps_the_models_of_another(monkeypatch, tmp_path):
    mine, theirs = object(), object()
    monkeypatch.setattr(tasks.train, "_TRAINERS", {"run-a": mine, "run-b": theirs})
    tasks.train.release_trainers("run-a")
    assert list(tasks.train._TRAINERS.values()) == [theirs]
    a, b = tmp_path / "a" / "result_current", tmp_path / "b" / "result_current"
    renderers = {f"{a.resolve()}:base:8": mine, f"{b.resolve()}:base:8": theirs}
    monkeypatch.setattr(tasks.select, "_RENDERERS", renderers)
    tasks.select.release_renderers(a)
    assert list(tasks.select._RENDERERS.values()) == [theirs]


def _row(subject: str, state: str, message: str = "") -> dict:
    return {"subject": subject, "state": state, "message": message}


def test_the_batch_fails_only_when_every_subject_failed():
    mixed = batch_state([_row("a", "Completed"), _row("b", "Failed", "only 3 usable photo(s); at least 5")])
    assert mixed.is_completed() and "1 of 2" in mixed.message and "failed: b" in mixed.message
    failed = batch_state([_row("a", "Crashed", "killed"), _row("b", "Failed", "at least 5")])
    assert failed.is_failed()
    assert "a: Crashed (killed)" in failed.message and "b: Failed (at least 5)" in failed.message
