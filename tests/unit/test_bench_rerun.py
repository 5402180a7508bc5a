"""bench.rerun's pure parts: its flags, the breakdown of a probed re-run and the report's maths, on made-up
records (the real bench starts Prefect's server and the demo flow: minutes, not run here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import rerun


def span(kind: str, name: str, start: float, end: float) -> dict:
    return {"kind": kind, "name": name, "start": start, "end": end}


def made_up_record() -> dict:
    """A re-run from t0 = 100: start 0.1, imports 0.4, checks 1.0, flow imports 2.0, then the flow call
    (server 3.0 before the body; body 4.0 with two tasks of 1.0 and 0.5 and outputs checks of 0.25), exit."""
    marks = {
        "t0": 100.0,
        "entered": 100.1,
        "cli_imported": 100.5,
        "check_start": 100.5,
        "check_end": 101.5,
        "import_start": 101.5,
        "import_end": 103.25,
        "flow_start": 103.5,
        "flow_end": 111.0,
        "main_end": 111.25,
    }
    spans = [
        span("bars", "quiet_library_bars", 103.5, 103.75),
        span("server", "temporary server start", 103.75, 106.75),
        span("flow", "train-subject", 107.0, 111.0 - 0.5),
        span("intact", "ingest", 107.0, 107.25),
        span("task", "ingest", 107.25, 108.25),
        span("key-all", "ingest", 107.3, 107.5),
        span("key-ours", "ingest", 107.3, 107.4),
        span("task", "start-run", 108.5, 109.0),
        span("body", "start-run", 108.6, 108.8),
    ]
    return {"code": 0, "marks": marks, "spans": spans}


def test_the_flags_and_their_defaults(capsys):
    args = rerun.parse_args(["--workdir", "/tmp/w", "--rounds", "5"])
    assert args.workdir == Path("/tmp/w") and args.rounds == 5 and not args.profile
    assert rerun.parse_args([]).rounds == 3
    with pytest.raises(SystemExit):
        rerun.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        rerun.parse_args(["--help"])
    assert "--workdir" in capsys.readouterr().out


def test_the_demo_command_is_the_makefiles():
    makefile = (Path(rerun.ROOT) / "Makefile").read_text()
    command = rerun.demo_command(Path("work/demo"))
    assert " ".join(command[:2]) == "-m flows.train_subject"
    for flag in ("--caption-model builtin:tiny-blip", "--base-model builtin:tiny-sd15", "--config demo/config.json"):
        assert flag in " ".join(command) and flag in makefile


def test_the_breakdown_adds_up_to_the_wall_time():
    record = made_up_record()
    rows = rerun.breakdown(record, wall=12.0)
    assert math.isclose(sum(rows.values()), 12.0)
    assert math.isclose(rows["process start"], 0.1)
    assert math.isclose(rows["imports: flow modules"], 1.75)
    assert math.isclose(rows["cli: console.quiet_library_bars"], 0.25)
    assert math.isclose(rows["temporary server start"], 3.0)
    assert math.isclose(rows["task: ingest"], 1.0) and math.isclose(rows["task: start-run"], 0.5)
    assert math.isclose(rows["stages' outputs checks (ours, before each task)"], 0.25)
    # the body (3.5 s) less its tasks (1.5 s) and the outputs checks (0.25 s)
    assert math.isclose(rows["flow body, other code outside tasks (ours)"], 1.75)
    # the flow call (7.5 s) less the bars (0.25 s), the body (3.5 s) and the server's start (3 s, before the body)
    assert math.isclose(rows["flow engine (Prefect, around the body)"], 0.75)
    assert math.isclose(rows["exit (server stop, flush)"], 0.75)


def test_a_task_call_splits_into_our_key_our_body_and_prefects_rest():
    parts = rerun.task_parts(made_up_record())
    assert list(parts) == ["ingest", "start-run"]
    ingest, start = parts["ingest"], parts["start-run"]
    assert math.isclose(ingest["key (ours)"], 0.1) and math.isclose(ingest["key (all)"], 0.2)
    assert math.isclose(ingest["prefect"], 0.9) and ingest["body (ours)"] == 0
    assert math.isclose(start["body (ours)"], 0.2) and math.isclose(start["prefect"], 0.3)


def test_a_task_inside_a_task_counts_once():
    spans = [span("task", "outer", 0, 10), span("task", "inner", 1, 2), span("task", "next", 10, 11)]
    assert [s["name"] for s in rerun._outermost(spans, "task")] == ["outer", "next"]


def test_the_summary_takes_medians_and_reads_the_goal_and_the_ratio():
    record = made_up_record()
    rounds = []
    for cli, bare in ((10.0, 5.0), (12.0, 4.0), (30.0, 6.0)):  # one slow round does not decide
        probe = {
            "wall": 12.0,
            "server": 3.0,
            "rows": rerun.breakdown(record, 12.0),
            "tasks": rerun.task_parts(record),
        }
        rounds.append(
            {"cli": {"wall": cli}, "probe": probe, "imports": {"wall": 4.0}, "bare": {"wall": bare, "server": 2}}
        )
    summary = rerun.summarize(rounds)
    assert summary["wall"]["cli"] == 12.0 and summary["wall"]["bare"] == 5.0
    assert math.isclose(summary["ratio"], 12.0 / 5.0)
    assert summary["ratios"] == [2.0, 3.0, 5.0]
    assert math.isclose(summary["cli_beyond_server"], 9.0) and summary["goal_met"] is False
    assert math.isclose(summary["ours_beyond_prefect"], 7.0) and math.isclose(summary["beyond_imports"], 8.0)
    text = rerun.report(summary, rounds=3, tasks=2)
    assert "ratio ours/bare Prefect flow: 2.40" in text
    assert "goal <= 5 s: NO" in text and "| task: ingest | 1.00 |" in text


def test_the_bench_keeps_prefect_and_hugging_face_in_its_folder_unless_set(tmp_path):
    env = rerun.bench_env(tmp_path, {"PATH": "/bin", "HF_HOME": "/mine"})
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect-home") and env["HF_HOME"] == "/mine"
    assert env["PATH"] == "/bin" and "OMP_NUM_THREADS" not in env
