"""Several machines, simulated on one: a Prefect server on a throw-away PostgreSQL, two workers, each pinned
to a core of its own with its own gpu-<worker id> limit, and the same batch of three subjects."""

from __future__ import annotations

import itertools
import shutil

import pytest

from tests.integration.batch_scenario import GOOD, SCREENSHOTS, check_subjects, overlap, run_batch
from tests.integration.services import postgres, prefect_server, require_binaries

pytestmark = pytest.mark.integration


def test_several_machines_on_postgres(tmp_path):
    """Two workers, each a 'machine' of its own (one core, its own gpu-<id> limit), one server on PostgreSQL."""
    require_binaries("initdb", "pg_ctl", "taskset")
    with postgres(tmp_path / "pg") as url, prefect_server(tmp_path / "prefect-home", database_url=url) as server:
        outcome = run_batch(server, tmp_path, ["box-a", "box-b"], subjects=1, cpus=["0", "1"])
    check_subjects(outcome)
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
