"""Kill anywhere (issue 15): the command line killed (SIGKILL) at random points spread over every stage, then
run again, until a run finishes: that run's outputs equal a never-killed run's, and after every kill no file
under its final name is half-written.

The kill points are drawn from a seed printed with the figures: a fixed one by default, so the suite asks the
same question every run (`LORA_KILL_SEED=N` replays another chain's draw, `LORA_KILL_SEED=random` draws a new
one; the moments themselves follow the machine's timing). With `LORA_RELIABILITY_FIGURES` set to a folder, the figures
docs/reliability.md quotes are written there as `kill_anywhere.json`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.tiny_models import materialize
from tests.conftest import KILL_SEED, ROOT, TINY_BLIP, photo
from tests.unit.test_training import TINY_SD15

TOKEN = "t0k3n"
EPOCHS = 2
# What a run does, in order (the Prefect task names its log shows: "Task run 'crop-1c4' - Finished in state"),
# training EPOCHS epochs and selecting without resuming (--max-resumes 0); "startup" is everything before the
# flow run begins: imports, the preflight, Prefect's temporary server.
STEPS = (
    "startup",
    "ingest",
    "export-settings",
    "checks",
    "crop",
    "buckets",
    "captions",
    "start-run",
    *("train-epoch",) * EPOCHS,
    "publish-run",
    "samples",
    "select",
    "publish-choice",
    "txt2img",
)
# Bookkeeping steps (tasks.stage.step) run in every run, cached or not: one that ended before the kill came
# can be aimed at again in the next run. A cached stage works only until it has finished once.
# The chain CI runs (it passed on the clean-clone CI run of 2026-12-01: 15 kills, one mid-sample).
EVERY_RUN = {"startup", "export-settings", "start-run", "publish-run", "publish-choice"}
NO_USER_FILES = {"startup", "start-run"}  # they write bookkeeping only: never killed "after a write"
BEGUN = "Beginning flow run"
FINISHED = re.compile(r"Task run '(?P<task>[a-z0-9-]+)-[0-9a-f]{3,}' - Finished in state")
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # lora_core.foundation.fs.atomic_output's mkstemp names
STAMP = re.compile(r"^[0-9a-f]{64}\s*$")
SAMPLE_TIME = re.compile(r"_\d{14}_")  # sd-scripts' sample names carry the second they were rendered
# LoRA metadata that names the moment or the session, not the weights (lora_core.training.metadata.kohya_metadata).
VOLATILE_METADATA = {"modelspec.date", "ss_training_started_at", "ss_training_finished_at", "ss_session_id"}
CONFIG = {
    "resolution": 256,
    "min_bucket_reso": 128,
    "max_bucket_reso": 512,
    "num_repeats": 2,
    "epoch": EPOCHS,
    "network_dim": 4,
    "network_alpha": 2,
    "sample_every_n_epochs": 1,
    "sample_prompts": "{token}, portrait photo --w 64 --h 64 --s 2",
    "selection": {"size": 64, "steps": 2, "seeds": [1, 2], "prompts": ["{token}, portrait photo"]},
}


class CliRun:
    """The command line in its own process group (Prefect's temporary server included), its log timed."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.starts = [self.started]  # when each of STEPS began; one more once the last has finished
        self.log, self.logged = log, False
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            if BEGUN in line or FINISHED.search(line):
                self.starts.append(time.monotonic())
            self.lines.append(line)

    def finished_tasks(self) -> list[str]:
        return [m["task"] for line in self.lines if (m := FINISHED.search(line))]

    def kill(self) -> None:
        """SIGKILL the whole group: the command line, its temporary server, anything else it started."""
        with contextlib.suppress(ProcessLookupError):  # all gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.wait(60)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self.reader.join(30)
        if not self.logged:
            with self.log.open("a") as out:
                out.writelines(self.lines)
            self.logged = True
        return code

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])


def make_cli(tmp_path: Path, photos: Path, config: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    count = Counter()

    def start(workdir: Path) -> CliRun:
        args = [str(photos), "--token", TOKEN, "--workdir", str(workdir), "--config", str(config)]
        args += ["--base-model", TINY_SD15, "--caption-model", TINY_BLIP, "--max-resumes", "0"]
        count[workdir.name] += 1
        log = logs / f"{workdir.name}-{count[workdir.name]:02d}.out"
        # A Prefect home (its database) per work folder: the reference runs beside the chain.
        home = {"PREFECT_HOME": str(tmp_path / f"prefect-{workdir.name}")}
        return CliRun([sys.executable, "-m", "flows.train_subject", *args], env | home, log)

    return start


# --- After a kill: nothing half-written under a final name ---------------------------------------------


def _check_csv(path: Path) -> None:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    assert rows and all(len(row) == len(rows[0]) for row in rows), "rows of unequal length"


def _check_image(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()


def _check_safetensors(path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            handle.get_tensor(key)


def _check_caption(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"{TOKEN}, ") and text.endswith("\n"), repr(text)


def _check_other(path: Path) -> bool:
    """A digest stamp or JSON by its content; False: a format this test does not know (the test fails on it: a
    new kind of file needs its check here)."""
    text = path.read_text(encoding="utf-8")
    if STAMP.match(text):
        return True
    if text.lstrip()[:1] in ("{", "["):
        json.loads(text)
        return True
    return False


CHECKS = {
    ".json": lambda p: json.loads(p.read_text(encoding="utf-8")),
    ".csv": _check_csv,
    ".png": _check_image,
    ".jpg": _check_image,
    ".safetensors": _check_safetensors,
}


def audit(subject: Path) -> dict:
    """Every file under the subject folder read as what its name says it is."""
    layout = SubjectLayout(subject.parent, subject.name)
    found = {"checked": 0, "temp": [], "prefect_partial": [], "unknown": [], "broken": []}
    for path in sorted(p for p in subject.rglob("*") if p.is_file()) if subject.is_dir() else []:
        rel = path.relative_to(subject)
        if path == layout.lock:
            continue  # rewritten in place by design: the flock is on its inode (foundation.lock reads any text)
        if TEMP_FILE.match(path.name) or (rel.parts[0] == "training_images" and rel.parts[1].startswith(".ingest-")):
            found["temp"].append(str(rel))  # a temporary name (ingest stages in training_images/.ingest-*)
            continue
        found["checked"] += 1
        try:
            if path.suffix in CHECKS:
                CHECKS[path.suffix](path)
            elif path.suffix == ".txt" and rel.parts[0] == "training_images":
                _check_caption(path)
            elif path.parent == layout.prefect_results:
                # Prefect's result records, written atomically (tasks.result_files): whole JSON, or absent.
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except ValueError:
                    found["prefect_partial"].append(str(rel))
            elif not _check_other(path):
                found["unknown"].append(str(rel))
        except Exception as err:
            found["broken"].append(f"{rel}: {type(err).__name__}: {err}")
    return found


# --- After the last run: the outputs a user reads equal the unkilled run's -------------------------------


def user_files(subject: Path) -> dict[str, Path]:
    """The files a user opens (nothing hidden), by path; sample names without their second."""
    files = {}
    for path in subject.rglob("*"):
        rel = path.relative_to(subject)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[SAMPLE_TIME.sub("_<time>_", str(rel))] = path
    return files


def _same_lora(a: Path, b: Path) -> list[str]:
    diffs = []
    with safe_open(str(a), framework="pt") as left, safe_open(str(b), framework="pt") as right:
        if set(left.keys()) != set(right.keys()):
            return ["tensor names differ"]
        names = sorted(left.keys())
        diffs += [f"tensor {k}" for k in names if not torch.equal(left.get_tensor(k), right.get_tensor(k))]
        meta_a, meta_b = left.metadata() or {}, right.metadata() or {}
        for key in sorted((set(meta_a) | set(meta_b)) - VOLATILE_METADATA):
            if meta_a.get(key) != meta_b.get(key):
                diffs.append(f"metadata {key}: {meta_a.get(key)!r} != {meta_b.get(key)!r}")
    return diffs


def differences(reference: Path, killed: Path) -> tuple[list[str], int]:
    """What differs between the two subject folders' user files, and how many files were compared."""
    ref_files, got_files = user_files(reference), user_files(killed)
    diffs = [f"only in the reference: {name}" for name in sorted(set(ref_files) - set(got_files))]
    diffs += [f"only after the kills: {name}" for name in sorted(set(got_files) - set(ref_files))]
    roots = [(str(reference.parent.resolve()), "<work>"), (str(killed.parent.resolve()), "<work>")]

    def text(path: Path) -> str:
        content = path.read_text(encoding="utf-8")
        for root, name in roots:
            content = content.replace(root, name)
        return content

    for name in sorted(set(ref_files) & set(got_files)):
        a, b = ref_files[name], got_files[name]
        if a.suffix == ".safetensors":
            diffs += [f"{name}: {d}" for d in _same_lora(a, b)]
        elif a.suffix in (".png", ".jpg"):
            with Image.open(a) as left, Image.open(b) as right:
                same = (left.mode, left.size, left.tobytes()) == (right.mode, right.size, right.tobytes())
            diffs += [] if same else [f"{name}: pixels"]
        elif a.suffix == ".json":
            left, right = json.loads(text(a)), json.loads(text(b))
            if a.name == "grid.json":  # its key hashes the epoch file's bytes, metadata times included
                left.pop("key"), right.pop("key")
            diffs += [] if left == right else [f"{name}: content"]
        elif text(a) != text(b):
            diffs.append(f"{name}: content")
    return diffs, len(ref_files)


# --- The chain ---------------------------------------------------------------------------------------


def _wait_for_step(run: CliRun, step: int, timeout: float = 300) -> float | None:
    """When `step` began in `run` (None: the run ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(run.starts) > step:
            return run.starts[step]
        if run.process.poll() is not None:
            run.wait(30)
            return run.starts[step] if len(run.starts) > step else None
        time.sleep(0.005)
    raise AssertionError(f"step {STEPS[step]} not reached in {timeout} s:\n{run.tail()}")


def _user_snapshot(subject: Path) -> dict[str, tuple[int, int]]:
    """Size and time of each file a user opens (nothing hidden)."""
    seen = {}
    for folder, subfolders, names in os.walk(subject):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                try:
                    stat = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                seen[os.path.relpath(os.path.join(folder, name), subject)] = (stat.st_size, stat.st_mtime_ns)
    return seen


def _wait_for_write(run: CliRun, subject: Path, step: int) -> str | None:
    """The next file a user opens that `step` writes (None: the step, or the run, ended first)."""
    before = _user_snapshot(subject)
    while len(run.starts) == step + 1 and run.process.poll() is None:
        now = _user_snapshot(subject)
        if changed := sorted(name for name, stamp in now.items() if before.get(name) != stamp):
            return changed[0]
        time.sleep(0.003)
    return None


def _aim(rng: random.Random, step: int) -> tuple[int, float, bool]:
    """A kill point in `step`: a random moment of it (a share of its duration), and half the time, from there,
    the moment the step next writes a file a user opens (the seams between a stage's files)."""
    after_write = STEPS[step] not in NO_USER_FILES and rng.random() < 0.5
    return step, rng.uniform(0.0, 0.4 if after_write else 0.7), after_write


def kill_chain(start, workdir: Path, reference: CliRun, rng: random.Random) -> list[dict]:
    """Kill a run in each step in turn (`_aim`), and run again. A step's duration is the time it took in the
    `reference` run (running alongside), or for a step that runs every time, the last time it took in this
    chain. A step that ended before its kill came is aimed at again (at most twice): a cached stage then at
    its start, so it dies in its replay (counted apart)."""
    aims = [_aim(rng, step) for step in (*range(1, len(STEPS)), 0)]  # start-up last: timed on this chain
    kills, retries, furthest, took = [], Counter(), 0, {}
    while aims:
        step, share, after_write = aims.pop(0)
        if step not in took:
            assert _wait_for_step(reference, step + 1, 600) is not None, f"the reference failed:\n{reference.tail()}"
            took[step] = reference.starts[step + 1] - reference.starts[step]
        run, written = start(workdir), None
        try:
            began = _wait_for_step(run, step)
            assert began is not None, f"run ended (exit {run.process.returncode}) before {STEPS[step]}:\n{run.tail()}"
            time.sleep(max(0.0, began + share * took[step] - time.monotonic()))
            written = _wait_for_write(run, workdir / TOKEN, step) if after_write else None
        finally:
            run.kill()
        assert run.process.returncode == -signal.SIGKILL, f"the run ended by itself before the kill:\n{run.tail()}"
        hit = len(run.starts) - 1  # len(STEPS): every task had finished, the process was closing
        took |= {k: b - a for k, (a, b) in enumerate(itertools.pairwise(run.starts)) if STEPS[k] in EVERY_RUN}
        if hit != step and retries[step] < 2:
            retries[step] += 1
            aims.insert(0, (step, rng.uniform(0.0, 0.7) if STEPS[step] in EVERY_RUN else 0.0, False))
        found = audit(workdir / TOKEN)
        name = STEPS[hit] if hit < len(STEPS) else "shutdown"
        kills.append(
            {
                "aimed_at": STEPS[step],
                "hit": name,
                "epoch": STEPS[:hit].count("train-epoch") + 1 if name == "train-epoch" else None,
                "after_s": round(time.monotonic() - run.started, 2),
                "into_step_s": round(time.monotonic() - run.starts[-1], 2),
                "after_writing": written if after_write else "(a moment, not a write)",
                "startup_s": round(run.starts[1] - run.started, 1) if len(run.starts) > 1 else None,
                # the stage had finished in an earlier run: Prefect's cache answered, nothing was being made
                "in_replay": hit < furthest and name not in EVERY_RUN,
                "files_checked": found["checked"],
                "temp_files": found["temp"],
                "prefect_partial": found["prefect_partial"],
                "unknown": found["unknown"],
                "broken": found["broken"],
            }
        )
        furthest = max(furthest, hit)
    return kills


def test_killed_anywhere_a_rerun_finishes_with_the_unkilled_outputs(builtin_models_home, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        photo((256 + 32 * i, 320), 90 + i).save(photos / f"p{i}.png")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    start = make_cli(tmp_path, photos, config)
    seed = KILL_SEED  # printed in the session's header
    for model in (TINY_SD15, TINY_BLIP):
        materialize(model)  # built before the reference run, so its steps take as long as a re-run's
    began, cpu = time.monotonic(), os.times()

    killed = tmp_path / "killed"
    reference = start(tmp_path / "reference")  # never killed; beside the chain (each mostly uses one core)
    try:
        kills = kill_chain(start, killed, reference, random.Random(seed))
        assert reference.wait(600) == 0, reference.tail()
        last = start(killed)
        try:
            code = last.wait(600)
        finally:
            last.kill()
    finally:
        reference.kill()
    assert reference.finished_tasks() == list(STEPS[1:]), f"the flow's tasks are not {STEPS[1:]}:\n{reference.tail()}"
    leftover = audit(killed / TOKEN)
    diffs, compared = differences(tmp_path / "reference" / TOKEN, killed / TOKEN) if code == 0 else (["no finish"], 0)

    figures = {
        "seed": seed,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "kills": len(kills),
        "runs": len(kills) + 1,
        "hits": dict(Counter(kill["hit"] for kill in kills)),
        "hits_in_cached_replay": dict(Counter(kill["hit"] for kill in kills if kill["in_replay"])),
        "final_run_exit": code,
        "files_checked": sum(kill["files_checked"] for kill in kills) + leftover["checked"],
        "half_written": [b for kill in kills for b in kill["broken"]] + leftover["broken"],
        "prefect_records_truncated": sum(len(kill["prefect_partial"]) for kill in kills),
        "temp_files_after_kills": sorted({t for kill in kills for t in kill["temp_files"]}),
        "temp_files_after_last_run": leftover["temp"],
        "unknown_formats": sorted({u for kill in kills for u in kill["unknown"]} | set(leftover["unknown"])),
        "outputs_compared": compared,
        "outputs_differing": diffs,
        "reference_run_s": round(reference.starts[-1] - reference.started, 1),
        "whole_test_s": round(time.monotonic() - began, 1),
        "cpu_s_of_the_runs": round(sum(os.times()[2:4]) - sum(cpu[2:4]), 1),
        "kill_log": kills,
    }
    print(json.dumps(figures, indent=1))
    if os.environ.get("LORA_RELIABILITY_FIGURES"):
        folder = Path(os.environ["LORA_RELIABILITY_FIGURES"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kill_anywhere.json").write_text(json.dumps(figures, indent=1) + "\n")

    assert code == 0, f"the run after {len(kills)} kills failed (seed {seed}):\n{last.tail()}"
    assert not figures["half_written"], figures["half_written"]
    assert not figures["prefect_records_truncated"], [k["prefect_partial"] for k in kills if k["prefect_partial"]]
    assert not figures["unknown_formats"], f"files this audit cannot judge: {figures['unknown_formats']}"
    assert not figures["temp_files_after_last_run"], figures["temp_files_after_last_run"]
    assert set(figures["hits"]) >= set(STEPS), f"steps never killed: {set(STEPS) - set(figures['hits'])}"
    assert not diffs, f"seed {seed}: the outputs differ from the unkilled run's: {diffs}"
