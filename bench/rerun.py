"""Where a cached re-run's seconds go: the demo command run again, every stage a cache hit (issue 24).

    python -m bench.rerun                          # a full demo run first, then 3 rounds; a few minutes on 2 cores
    python -m bench.rerun --workdir /tmp/rerun --rounds 5
    python -m bench.rerun --profile                # also one re-run under cProfile: our functions by time

The same command as `make demo` (`python -m flows.train_subject demo/photos --token t0k3n ...`) runs once
in full (unless `--workdir` already holds a finished run), then again in alternating rounds, each process
under a timeout, in the environment as it is (threads included); only `PREFECT_HOME` and `HF_HOME` go into
the work folder unless they are set, so Prefect's temporary server keeps its database there. Per round:

- `cli`: the command itself, wall time from the parent (the figure a user waits);
- `probe`: the same command in a process that wraps a few functions with clocks (`probe` below): the
  phases of the run (start-up, imports, the checks before the run, Prefect's temporary server, the flow,
  each task with its cache key, its outputs check and its body, the summary, the exit);
- `imports`: `python -c "import flows.train_subject"`, the bare start a re-run cannot avoid today;
- `bare`: a plain Prefect flow of as many no-op cached tasks (persisted JSON results, Prefect's `INPUTS`
  cache policy) on the same temporary server and database: Prefect's own cost of a cached re-run.

The ratio ours/bare says how much of the re-run is ours beyond Prefect's own; the goal (issue 24) is a
re-run of at most 5 s beyond the temporary server's start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.rerun_probe import T0_ENV, bare_flow, probe

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0k3n"
GOAL_BEYOND_SERVER_S = 5.0
WAYS = ("cli", "probe", "imports", "bare")


def demo_command(workdir: Path) -> list[str]:
    """The Makefile's demo target, with the subject under `workdir`."""
    return [
        "-m",
        "flows.train_subject",
        "demo/photos",
        "--token",
        TOKEN,
        "--workdir",
        str(workdir),
        "--caption-model",
        "builtin:tiny-blip",
        "--base-model",
        "builtin:tiny-sd15",
        "--config",
        "demo/config.json",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rerun",
        description="Time cached re-runs of the demo command and break them down (issue 24).",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="the bench's folder: the subject in WORKDIR/work, Prefect's home and HF_HOME beside it (kept, "
        "reused: a finished run there is not trained again; default: a new temporary folder)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each way (default: 3)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed to each re-run process (default: 300)"
    )
    parser.add_argument(
        "--first-timeout", type=float, default=1800.0, help="seconds allowed to the full first run (default: 1800)"
    )
    parser.add_argument("--profile", action="store_true", help="also one re-run under cProfile: our functions by time")
    parser.add_argument("--json", type=Path, help="write the rounds and the summary here as JSON")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        build_parser().error("--rounds must be at least 1")
    return args


# --- The breakdown (pure: tested on made-up records) --------------------------------------------


def _total(spans: Iterable[dict], kind: str, name: str | None = None) -> float:
    return sum(s["end"] - s["start"] for s in spans if s["kind"] == kind and (name is None or s["name"] == name))


def _outermost(spans: list[dict], kind: str) -> list[dict]:
    """Spans of `kind` not inside another of the same kind (a task called inside a task counts once)."""
    chosen = sorted((s for s in spans if s["kind"] == kind and "end" in s), key=lambda s: s["start"])
    top: list[dict] = []
    for span in chosen:
        if top and span["end"] <= top[-1]["end"]:
            continue
        top.append(span)
    return top


def breakdown(record: dict, wall: float) -> dict[str, float]:
    """A probed run's phases in seconds, summing to `wall` (the parent's clock from start to exit).

    Phases: process start (to our first line), the CLI's imports, the checks before the run (config, torch,
    preflight), importing the flow's modules, Prefect's temporary server start, the flow body (split into
    each task call and our code outside the tasks), Prefect's flow engine around the body, the summary,
    and the exit (the server stopped, logs flushed, the interpreter shut down).
    """
    m, spans = record["marks"], [s for s in record["spans"] if "end" in s]
    end = m["t0"] + wall
    rows: dict[str, float] = {"process start": m["entered"] - m["t0"]}
    if "cli_imported" in m:
        rows["imports: flows.cli"] = m["cli_imported"] - m["entered"]
    if "check_start" in m:
        rows["cli checks (config, torch, preflight)"] = m["check_end"] - m["check_start"]
        rows["cli: other"] = (m["check_start"] - m["cli_imported"]) + (m["import_start"] - m["check_end"])
    rows["imports: flow modules"] = m["import_end"] - m["import_start"]
    rows["imports: Prefect's server + engine modules (in a plain run: at the server's start)"] = (
        m["flow_start"] - m["import_end"]
    )
    bars = _total(spans, "bars")
    rows["cli: console.quiet_library_bars"] = bars
    flow_call = m["flow_end"] - m["flow_start"] - bars
    server = _total(spans, "server")
    bodies = [s for s in spans if s["kind"] == "flow"]
    body = sum(s["end"] - s["start"] for s in bodies)
    server_in_body = sum(
        s["end"] - s["start"]
        for s in spans
        if s["kind"] == "server" and any(b["start"] <= s["start"] < b["end"] for b in bodies)
    )
    tasks = _outermost(spans, "task")
    in_tasks = sum(s["end"] - s["start"] for s in tasks)
    rows["temporary server start"] = server
    rows["flow engine (Prefect, around the body)"] = flow_call - body - (server - server_in_body)
    for name, seconds in task_seconds(tasks).items():
        rows[f"task: {name}"] = seconds
    intact = _total(spans, "intact")
    rows["stages' outputs checks (ours, before each task)"] = intact
    rows["flow body, other code outside tasks (ours)"] = body - in_tasks - server_in_body - intact
    rows["summary + return"] = m["main_end"] - m["flow_end"]
    rows["exit (server stop, flush)"] = end - m["main_end"]
    return rows


def task_seconds(tasks: list[dict]) -> dict[str, float]:
    """Seconds per task name, in first-call order (a name called twice sums)."""
    seconds: dict[str, float] = {}
    for span in tasks:
        seconds[span["name"]] = seconds.get(span["name"], 0.0) + span["end"] - span["start"]
    return seconds


def task_parts(record: dict) -> dict[str, dict[str, float]]:
    """Per task name: the whole call; of it our cache key and the body where it ran (a step; Prefect's
    result handling included); the rest is Prefect's (task engine, API calls, the cached result read).
    The Stage's outputs check runs before the call, outside it."""
    spans = [s for s in record["spans"] if "end" in s]
    parts: dict[str, dict[str, float]] = {}
    for name, seconds in task_seconds(_outermost(spans, "task")).items():
        key = _total(spans, "key-ours", name)
        body = _total(spans, "body", name)
        parts[name] = {
            "call": seconds,
            "key (ours)": key,
            "key (all)": _total(spans, "key-all", name),
            "body (ours)": body,
            "outputs check (ours)": _total(spans, "intact", name),
            "prefect": seconds - key - body,
        }
    return parts


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """The median of each row over rounds (a row missing in a round counts 0 there), in first-seen order."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: statistics.median(row.get(name, 0.0) for row in rows) for name in names}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of each way's wall time, server start and breakdown, and the ratios the goal reads."""
    wall = {way: statistics.median(r[way]["wall"] for r in rounds) for way in WAYS if all(way in r for r in rounds)}
    server = {
        way: statistics.median(r[way]["server"] for r in rounds)
        for way in ("probe", "bare")
        if all(way in r for r in rounds)
    }
    result: dict[str, Any] = {"wall": wall, "server": server}
    if "probe" in wall:
        result["breakdown"] = median_rows([r["probe"]["rows"] for r in rounds])
        result["tasks"] = {
            name: median_rows([r["probe"]["tasks"].get(name, {}) for r in rounds])
            for name in dict.fromkeys(n for r in rounds for n in r["probe"]["tasks"])
        }
    if "cli" in wall and "probe" in server:
        result["cli_beyond_server"] = wall["cli"] - server["probe"]
        result["goal_met"] = result["cli_beyond_server"] <= GOAL_BEYOND_SERVER_S
    if "cli" in wall and "bare" in wall:
        result["ratio"] = wall["cli"] / wall["bare"]
        result["ours_beyond_prefect"] = wall["cli"] - wall["bare"]
        per_round = [r["cli"]["wall"] / r["bare"]["wall"] for r in rounds if "cli" in r and "bare" in r]
        result["ratios"] = per_round
    if "cli" in wall and "imports" in wall:
        result["beyond_imports"] = wall["cli"] - wall["imports"]
    return result


def report(summary: dict[str, Any], rounds: int, tasks: int) -> str:
    """The table and the ratio, as printed."""
    wall, server = summary["wall"], summary["server"]
    lines = [f"cached re-run of the demo, median of {rounds} round(s), seconds", ""]
    lines += ["| way | wall | of it temporary server start |", "|---|---|---|"]
    labels = {
        "cli": "ours: the demo command, cached re-run",
        "probe": "ours, with clocks (the breakdown below)",
        "imports": "bare start: python -c 'import flows.train_subject'",
        "bare": f"bare Prefect flow, {tasks} no-op cached tasks, same server",
    }
    for way, label in labels.items():
        if way in wall:
            lines.append(
                f"| {label} | {wall[way]:.2f} | {server[way]:.2f} |"
                if way in server
                else f"| {label} | {wall[way]:.2f} | |"
            )
    if "breakdown" in summary:
        lines += ["", "| phase (probed run) | s |", "|---|---|"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in summary["breakdown"].items()]
        lines += [f"| total | {sum(summary['breakdown'].values()):.2f} |"]
        lines += ["", "| task | call | key (ours) | key (all) | outputs check (ours) | body (ours) | Prefect |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, p in summary["tasks"].items():
            lines.append(
                f"| {name} | {p['call']:.3f} | {p['key (ours)']:.3f} | {p['key (all)']:.3f} | "
                f"{p['outputs check (ours)']:.3f} | {p['body (ours)']:.3f} | {p['prefect']:.3f} |"
            )
    lines.append("")
    if "cli_beyond_server" in summary:
        met = "yes" if summary["goal_met"] else "NO"
        lines.append(
            f"beyond the server's start: {summary['cli_beyond_server']:.2f} s "
            f"(goal <= {GOAL_BEYOND_SERVER_S:.0f} s: {met})"
        )
    if "ratio" in summary:
        per = ", ".join(f"{r:.2f}" for r in summary["ratios"])
        lines.append(
            f"ratio ours/bare Prefect flow: {summary['ratio']:.2f} (per round {per}); "
            f"ours beyond Prefect's own: {summary['ours_beyond_prefect']:.2f} s"
        )
    if "beyond_imports" in summary:
        lines.append(f"ours beyond the bare imports: {summary['beyond_imports']:.2f} s")
    return "\n".join(lines)


# --- The parent: processes, rounds ------------------------------------------------------------


def bench_env(base: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment as it is, with PREFECT_HOME and HF_HOME under `base` unless set, and no network."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("PREFECT_HOME", str(base / "prefect-home"))
    env.setdefault("HF_HOME", str(base / "hf-home"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def timed_process(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> float:
    """Run `python argv` from the project root under `timeout`; its wall seconds. Output goes to `log`."""
    env = {**env, T0_ENV: repr(time.time())}
    start = float(env[T0_ENV])
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    wall = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... exited {done.returncode}; its output: {log}")
    return wall


def has_finished_run(workdir: Path) -> bool:
    return (workdir / TOKEN / "result_current" / "selection.json").is_file()


def run_way(way: str, base: Path, env: dict[str, str], args: argparse.Namespace, tasks: int, n: int) -> dict:
    work, logs = base / "work", base / "logs"
    log, out = logs / f"{way}-{n}.log", logs / f"{way}-{n}.json"
    if way == "cli":
        return {"wall": timed_process(demo_command(work), env, args.timeout, log)}
    if way == "imports":
        return {"wall": timed_process(["-c", "import flows.train_subject"], env, args.timeout, log)}
    if way == "probe":
        wall = timed_process(["-m", "bench.rerun", "_probe", str(out), *demo_command(work)[2:]], env, args.timeout, log)
        record = json.loads(out.read_text())
        tasks_ = _outermost([s for s in record["spans"] if "end" in s], "task")
        return {
            "wall": wall,
            "server": _total(record["spans"], "server"),
            "rows": breakdown(record, wall),
            "tasks": task_parts(record),
            "task_calls": len(tasks_),
            "cached": record["marks"]["summary"]["cached"],
        }
    wall = timed_process(
        ["-m", "bench.rerun", "_bare", str(tasks), str(base / "bare-results"), str(out)], env, args.timeout, log
    )
    record = json.loads(out.read_text())
    return {"wall": wall, "server": _total(record["spans"], "server")}


def profile_once(base: Path, env: dict[str, str], timeout: float, top: int = 25) -> str:
    """One re-run under cProfile; our functions (flows/, tasks/, lora_core/) by cumulative seconds."""
    import pstats

    stats_file, log = base / "logs" / "profile.pstats", base / "logs" / "profile.log"
    argv = ["-m", "cProfile", "-o", str(stats_file), "-m", *demo_command(base / "work")[1:]]
    timed_process(argv, env, timeout, log)
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    ours = []
    for (file, line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        rel = Path(file).resolve()
        if rel.is_relative_to(ROOT) and rel.parts[len(ROOT.parts)] in ("flows", "tasks", "lora_core"):
            ours.append((ct, f"{rel.relative_to(ROOT)}:{line} {func}"))
    ours.sort(reverse=True)
    lines = ["our functions under cProfile (cumulative s; nested calls overlap; cProfile slows Python code)"]
    lines += [f"  {ct:7.3f}  {where}" for ct, where in ours[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:  # internal: a probed re-run (the parent starts it)
        return probe(Path(argv[1]), argv[2:])
    if argv[:1] == ["_bare"]:  # internal: the bare Prefect flow
        return bare_flow(int(argv[1]), Path(argv[2]), Path(argv[3]))
    args = parse_args(argv)
    base = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    (base / "logs").mkdir(parents=True, exist_ok=True)
    env = bench_env(base)
    print(f"bench folder: {base} (PREFECT_HOME={env['PREFECT_HOME']}, HF_HOME={env['HF_HOME']})")
    if not has_finished_run(base / "work"):
        print("the first, full run of the demo ...", flush=True)
        first = timed_process(demo_command(base / "work"), env, args.first_timeout, base / "logs" / "first.log")
        print(f"first run: {first:.1f} s")
    warm = run_way("probe", base, env, args, 0, 0)  # untimed: counts the tasks, warms the caches
    tasks = warm["task_calls"]
    ran = sorted(set(warm["tasks"]) - set(warm["cached"]))
    print(f"warm-up: {tasks} task calls; cached: {', '.join(warm['cached'])}; ran (steps): {', '.join(ran) or '-'}")
    run_way("bare", base, env, args, tasks, 0)  # untimed: fills the bare flow's cache
    rounds = []
    for n in range(1, args.rounds + 1):
        order = WAYS if n % 2 else tuple(reversed(WAYS))
        rounds.append({way: run_way(way, base, env, args, tasks, n) for way in order})
        print(f"round {n}: " + ", ".join(f"{way} {rounds[-1][way]['wall']:.2f} s" for way in WAYS), flush=True)
    summary = summarize(rounds)
    print()
    print(report(summary, len(rounds), tasks))
    if args.profile:
        print()
        print(profile_once(base, env, args.timeout))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary, "tasks": tasks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
