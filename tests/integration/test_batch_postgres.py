"""Several machines, simulated on one: a Prefect server on a throw-away PostgreSQL, two workers, each pinned
to a core of its own with its own gpu-<worker id> limit, and the same batch of three subjects."""

from __future__ import annotations

import itertools
import shutil

import pytest

from tests.integration.batch_scenario import GOOD, GPU_STAGES, SCREENSHOTS, check_subjects, overlap, run_batch
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
    # Three subjects on two machines: some two shared one (asserted, not assumed), and on each machine no two
    # subjects' GPU stages ran at once. No `if`: the check runs on every run of this test.
    shared = [(a, b) for a, b in itertools.combinations(sorted(outcome.subjects), 2) if by_worker[a] == by_worker[b]]
    assert shared, by_worker
    gpu = {token: [span for stage in GPU_STAGES for span in outcome.spans(stage, token)] for token in outcome.subjects}
    assert all(gpu[token] for token in GOOD), gpu  # both good subjects ran their GPU stages
    clashes = [(a, b, x, y) for a, b in shared for x in gpu[a] for y in gpu[b] if overlap(x, y)]
    assert not clashes, f"GPU stages of two subjects ran at once on one machine: {clashes}"
    if SCREENSHOTS:
        shutil.copytree(outcome.logs, SCREENSHOTS / "postgres-logs", dirs_exist_ok=True)
