"""What a user meets at the terminal: Ctrl-C, a second run on the same subject, a full disk, shared
files, the errors before and inside a run, Prefect's temporary server.

The command-line tests run `python -m flows.train_subject` as a real process (its own process group, as
a terminal starts it), on the tiny models; figures for docs/reliability.md are written to
$LORA_RELIABILITY_FIGURES/interrupts.json when that is set.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from flows import console
from lora_core.foundation.fs import DiskFullError, atomic_write_text
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lock import SubjectBusyError, subject_lock
from tests.conftest import DEMO_PHOTOS, ROOT, TINY_BLIP, encode, photo

TINY_SD15 = "builtin:tiny-sd15"
FIGURES: dict[str, dict] = {}


def _record(name: str, **figures: object) -> None:
    """Keep a figure for docs/reliability.md (written when LORA_RELIABILITY_FIGURES names a folder)."""
    FIGURES.setdefault(name, {}).update(figures)
    folder = os.environ.get("LORA_RELIABILITY_FIGURES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "interrupts.json").write_text(json.dumps(FIGURES, indent=2))


@pytest.fixture
def subject(tmp_path) -> dict:
    """Five captioned photos and a small config: three epochs of ten steps on the tiny models."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        photo((256, 320), 70 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man, photo {i}")
    config = tmp_path / "config.json"
    config.write_text(
        '{"resolution": 256, "min_bucket_reso": 128, "max_bucket_reso": 512, "num_repeats": 2, '
        '"epoch": 3, "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return {"photos": photos, "config": config, "env": env, "work": tmp_path / "work"}


def _command(subject: dict, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.train_subject",
        str(subject["photos"]),
        "--token",
        "t0k3n",
        "--workdir",
        str(subject["work"]),
        "--base-model",
        TINY_SD15,
        "--caption-model",
        TINY_BLIP,
        "--config",
        str(subject["config"]),
        *extra,
    ]


def _group_gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _whole_files(folder: Path) -> int:
    """Every file under a final name is whole (safetensors parse, JSON parses); returns how many."""
    checked = 0
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as handle:
                list(handle.keys())
        elif path.suffix == ".json" and path.is_file():
            json.loads(path.read_text())
        checked += path.is_file()
    return checked


def _epochs_done(log: Path) -> int:
    """Epoch tasks Prefect has logged as completed."""
    return sum("Task run 'train-epoch" in line and "Completed" in line for line in log.read_text().splitlines())


# --- Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_during_an_epoch_stops_within_seconds_and_the_next_run_continues(subject, tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            _command(subject, "--stop-after", "train"),
            cwd=ROOT,
            env=subject["env"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # a terminal's job: Ctrl-C reaches the whole group, Prefect's server too
        )
    first = subject["work"] / "t0k3n" / "result_current" / "t0k3n-000001.safetensors"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not _epochs_done(err):
        time.sleep(0.05)
    assert first.exists(), err.read_text()[-3000:]
    os.killpg(process.pid, signal.SIGINT)
    pressed = time.monotonic()
    code = process.wait(timeout=60)
    took = time.monotonic() - pressed
    text = err.read_text()
    assert code == console.EXIT_INTERRUPTED, text[-3000:]
    assert took < console.STOP_GRACE_S + 5, took
    assert re.search(r"stopped (during epoch 2|after epoch 1); run the same command to continue", text), text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert _group_gone(process.pid), "a process of the run outlived it"
    whole = _whole_files(subject["work"])
    assert not (subject["work"] / "t0k3n" / "result_current" / "t0k3n-000002.safetensors").exists()

    again = subprocess.run(
        _command(subject, "--stop-after", "train"),
        cwd=ROOT,
        env=subject["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    kept = "epoch 1 was finished before the last run stopped; kept" in again.stdout + again.stderr
    assert "train (cached): epoch 1" in again.stdout or kept, again.stdout[-3000:]
    assert "train: epoch 3" in again.stdout
    _record("ctrl_c", tried=1, exit_code=code, seconds_to_exit=round(took, 1), files_checked_whole=whole)


def test_a_second_ctrl_c_exits_at_once_and_the_first_has_a_deadline(monkeypatch):
    left: list[tuple[float, str]] = []
    monkeypatch.setattr(console, "_leave", lambda message: left.append((time.monotonic(), message)))
    monkeypatch.setattr(console, "STOP_GRACE_S", 1.0)
    prefect_logs = logging.getLogger("prefect")
    monkeypatch.setattr(prefect_logs, "level", prefect_logs.level)  # the handler quiets Prefect: undone after
    monkeypatch.setattr(console, "_running_stage", lambda: "during epoch 2")  # other tests ran stages here
    interrupts = console._Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts.on_sigint)  # as console.guard installs it
    first = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):  # a real SIGINT, as the terminal sends it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        assert interrupts.stopped_during == "during epoch 2" and not left
        second = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # the second: leaves without raising or waiting
        time.sleep(0.1)  # (the handler has run by now)
        assert len(left) == 1 and left[0][0] - second < 0.5 and "stopped during epoch 2" in left[0][1]
    finally:  # the deadline must never outlive the patches: the real one exits the process
        signal.signal(signal.SIGINT, previous)
        if interrupts.deadline is not None:
            interrupts.deadline.join(timeout=10)
    assert not interrupts.deadline.is_alive() and len(left) == 2 and left[1][0] - first >= 1.0


# --- Two runs on one subject ------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from lora_core.foundation.lock import subject_lock
with subject_lock(Path(sys.argv[1]), Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(lock: Path, folder: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock), str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_on_a_subject_in_use_refuses_at_once_naming_the_other(subject):
    layout = SubjectLayout(subject["work"], "t0k3n")
    other = _holder(layout.lock, layout.root)
    try:
        start = time.monotonic()
        done = subprocess.run(
            _command(subject), cwd=ROOT, env=subject["env"], capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - start
        assert done.returncode == 2, done.stderr
        assert f"in use by pid {other.pid} on {socket.gethostname()}" in done.stderr
        assert "Traceback" not in done.stderr and took < 15
        assert not layout.training_images.exists()  # nothing written beside the other run
    finally:
        other.kill()
        other.wait()
    _record("two_runs", tried=1, refused_in_seconds=round(took, 1))


def test_the_flow_itself_takes_the_lock(prefect_harness, subject):
    """A deployment's run (no command line in front of it) refuses too."""
    from flows.train_subject import train_subject

    layout = SubjectLayout(subject["work"], "t0k3n")
    other = _holder(layout.lock, layout.root)
    try:
        with pytest.raises(SubjectBusyError, match=f"pid {other.pid}"):
            train_subject(photos=subject["photos"], token="t0k3n", workdir=subject["work"], stop_after="ingest")
    finally:
        other.kill()
        other.wait()
    assert not layout.manifest.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / ".pipeline" / "lock"
    other = _holder(lock, tmp_path)
    with pytest.raises(SubjectBusyError), subject_lock(lock, tmp_path):
        pass
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert json.loads(lock.read_text())["pid"] == other.pid  # the dead holder's words are still there
    with subject_lock(lock, tmp_path) as stale:
        assert stale["pid"] == other.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# --- A full disk ------------------------------------------------------------------------------


def _full_disk_for(monkeypatch: pytest.MonkeyPatch, pattern: str) -> list[Path]:
    """Make writing any temporary file for a name containing `pattern` fail as a full disk does."""
    hit: list[Path] = []
    write_bytes = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if pattern in self.name and self.name.endswith(".tmp"):
            hit.append(self)
            write_bytes(self, data[: len(data) // 2])  # a partial write, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    return hit


@pytest.mark.parametrize(
    ("pattern", "what"),
    [("t0k3n-000002.safetensors", "epoch 2"), (".latents.safetensors", "epoch 1")],
)
def test_a_full_disk_keeps_the_finished_work_and_says_where(
    prefect_harness, subject, capsys, monkeypatch, pattern, what
):
    from flows.cli import main

    args = _command(subject, "--stop-after", "train")[3:]
    if "latents" in pattern:
        subject["config"].write_text(subject["config"].read_text().replace("{", '{"cache_latents_to_disk": true, ', 1))
    hit = _full_disk_for(monkeypatch, pattern)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and hit, err
    assert f"error: {what}: the disk is full: could not write {hit[0].parent}" in err, err
    assert "Traceback" not in err
    result = subject["work"] / "t0k3n" / "result_current"
    before = {p.name: p.read_bytes() for p in result.glob("*.safetensors")}
    assert ("t0k3n-000001.safetensors" in before) == (what == "epoch 2")
    assert not list(result.glob("*.tmp")) and not list(result.glob(".*.tmp"))  # the partial file went too
    _whole_files(subject["work"])

    monkeypatch.undo()  # room again: the same command continues
    assert main(args) == 0
    out = capsys.readouterr().out
    for name, data in before.items():
        assert (result / name).read_bytes() == data, name  # the finished epoch is the one continued from
    assert "train: epoch 3" in out
    _record(f"disk_full_{what.replace(' ', '_')}", tried=1, kept=sorted(before), continued=True)


# --- Files a user shares ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_take_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "plain.txt").write_text("x")  # what any other program makes under this umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_a_finished_run_is_readable_by_others_and_keeps_its_bookkeeping_in_one_place(prefect_harness, subject, capsys):
    from flows.cli import main

    previous = os.umask(0o022)
    try:
        assert main(_command(subject, "--stop-after", "train")[3:]) == 0, capsys.readouterr().err
    finally:
        os.umask(previous)
    root = subject["work"] / "t0k3n"
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
    private = {name: oct(mode) for name, mode in modes.items() if mode != 0o644}
    assert not private, private
    kinds = {Path(name).suffix for name in modes}
    assert {".safetensors", ".txt", ".csv", ".json", ".png"} <= kinds
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".pipeline"]
    assert (root / ".pipeline" / "prefect-results").is_dir() and (root / ".pipeline" / "train-state").is_dir()
    _record("shared_files", files_checked=len(modes), not_0644=len(private))


def test_a_subject_folder_from_before_keeps_its_bookkeeping(tmp_path):
    layout = SubjectLayout(tmp_path, "t0k3n")
    (layout.root / ".caption-cache").mkdir(parents=True)
    (layout.root / ".caption-cache" / "x.json").write_text("{}")
    (layout.root / ".ingest-stamp").write_text("abc")
    assert sorted(layout.move_old_bookkeeping()) == [".caption-cache", ".ingest-stamp"]
    assert (layout.caption_cache / "x.json").read_text() == "{}" and layout.ingest_stamp.read_text() == "abc"
    assert not (layout.root / ".caption-cache").exists()


# --- Errors a user sees ------------------------------------------------------------------------


def _cpu_seconds(command: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--help"], 0, "usage:"),
        (["photos", "--token", "t", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (["/no/such/folder", "--token", "t"], 2, "/no/such/folder: no such folder or zip"),
    ],
)
def test_help_a_bad_flag_and_a_missing_path_answer_in_well_under_a_second(args, code, says):
    done, cpu = _cpu_seconds([sys.executable, "-m", "flows.train_subject", *args])
    assert done.returncode == code and says in done.stdout + done.stderr, done.stderr
    assert cpu < 0.8, f"{cpu:.2f} s of CPU"
    _record("fast_answers", **{args[-1]: round(cpu, 2)})


_CHECKS_ONLY = """
import sys
from flows.cli import build_parser, main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "prefect", "pandera") if m in sys.modules)
print(code, ",".join(heavy))
"""


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "missing", "no such folder or zip"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no photos in it"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "expected a folder of photos or a .zip"),
    ],
)
def test_the_path_checks_load_no_torch_and_no_prefect(tmp_path, make, says):
    target = make(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _CHECKS_ONLY, str(target), "--token", "t0k3n", "--workdir", str(tmp_path / "W")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert says in done.stderr, done.stderr
    assert done.stdout.split() == ["2"], done.stdout  # exit 2, and none of the heavy modules loaded
    assert not (tmp_path / "W").exists()


@pytest.mark.parametrize(
    ("base", "says"),
    [
        ("does/not/exist", "no such file or folder"),
        ("runwayml/stable-diffusion-v1-5", "is not in the local Hugging Face cache"),
        ("builtin:tiny-flux", "is FLUX.1, but the config says model_family=sd15"),
    ],
)
def test_a_base_model_that_is_not_there_is_refused_before_any_stage(tmp_path, base, says):
    """A missing path, an offline hub id, a model of another family: exit 2 in seconds, not after captioning."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect"))
    command = [sys.executable, "-m", "flows.train_subject", str(DEMO_PHOTOS), "--token", "t0k3n"]
    command += ["--workdir", str(tmp_path / "W"), "--base-model", base, "--caption-model", "builtin:tiny-blip"]
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and base in errors[0], done.stderr  # one line, naming the model as given
    assert "ingest" not in done.stdout + done.stderr and not (tmp_path / "W" / "t0k3n").exists()
    assert elapsed < 5, f"{elapsed:.1f} s"
    _record("base_model_refused", **{base: round(elapsed, 2)})


def test_too_few_photos_is_said_before_prefect_starts(tmp_path, capsys):
    from flows.cli import main

    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(encode(photo((640, 480), i)))
    assert main([str(folder), "--token", "t0k3n", "--workdir", str(tmp_path / "W")]) == 2
    assert "3 file(s) that may be photos, and at least 5 usable photos are needed" in capsys.readouterr().err
    assert "prefect" not in sys.modules or not (tmp_path / "W").exists()


def test_a_user_error_inside_a_stage_is_one_line_naming_the_stage(subject):
    for i in range(3):  # five files, three of them not photos: ingest itself finds too few
        (subject["photos"] / f"p{i}.png").write_bytes(b"not a photo")
    done = subprocess.run(_command(subject), cwd=ROOT, env=subject["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "error: ingest: only 2 usable photo(s)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Finished in state Failed" not in done.stderr, done.stderr


def test_the_temporary_server_gets_time_to_start_and_a_failure_is_one_line(subject, monkeypatch):
    monkeypatch.delenv(console._TIMEOUT_VAR, raising=False)
    console.prefect_defaults()
    assert int(os.environ[console._TIMEOUT_VAR]) >= 120  # Prefect's own 20 s is not enough on a busy machine
    monkeypatch.setenv(console._TIMEOUT_VAR, "7")
    console.prefect_defaults()
    assert os.environ[console._TIMEOUT_VAR] == "7"  # the user's choice stands

    env = subject["env"] | {console._TIMEOUT_VAR: "0"}  # a server that cannot make it in time
    done = subprocess.run(
        _command(subject, "--stop-after", "ingest"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == console.EXIT_SERVER, done.stderr
    assert "error: Prefect's temporary server did not start within 0 s" in done.stderr, done.stderr
    assert "PREFECT_API_URL" in done.stderr and "Traceback" not in done.stderr


def test_disk_full_errors_are_user_errors_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")
    hit = _full_disk_for(monkeypatch, "x.json")
    with pytest.raises(DiskFullError, match=f"could not write {target}"):
        atomic_write_text(target, "new" * 1000)
    assert hit and target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
