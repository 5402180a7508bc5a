"""Shared fixtures: synthetic photos, the demo set, and one Prefect test harness."""

from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from bench.photos import photo

ROOT = Path(__file__).resolve().parent.parent
DEMO_PHOTOS = ROOT / "demo" / "photos"

# The embedded Prefect server must not try the network during tests, and no
# test may download a model: the hub is off, tiny models are built locally.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
# Nothing of the user's own: a Hugging Face cache or a Prefect home (profiles, settings, a database) must not
# make a test pass or fail. Set before Prefect or huggingface_hub are imported; removed when the tests end.
_HOMES = Path(tempfile.mkdtemp(prefix="lora-tests-"))
os.environ["HF_HOME"] = str(_HOMES / "hf")
os.environ["PREFECT_HOME"] = str(_HOMES / "prefect")
atexit.register(shutil.rmtree, _HOMES, ignore_errors=True)
TINY_BLIP = "builtin:tiny-blip"

# The kill-anywhere chain's draw of kill points (tests/resilience/test_kill_anywhere.py): fixed, so every run
# asks the same question; LORA_KILL_SEED=N replays another draw, LORA_KILL_SEED=random draws a new one.
FIXED_KILL_SEED = 1332266801


def kill_seed() -> int:
    import random

    asked = os.environ.get("LORA_KILL_SEED", str(FIXED_KILL_SEED))
    return random.SystemRandom().randrange(2**31) if asked == "random" else int(asked)


KILL_SEED = kill_seed()  # once per session, so the header says the seed the chain uses


def pytest_report_header(config: pytest.Config) -> str:
    return f"kill chain seed: {KILL_SEED} ({'LORA_KILL_SEED' if 'LORA_KILL_SEED' in os.environ else 'fixed'})"


def _train_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Where the GPU-path tests (`-m gpu`) train: the GPU where there is one, else the CPU in the same precisions.
TRAIN_DEVICE = _train_device()


@pytest.fixture(autouse=True)
def library_logs_to_live_stderr():
    """diffusers and transformers bind `sys.stderr` once, at their first log line. When that was a test's
    capsys stream, it is closed by the next test, and a later warning prints logging's own traceback into
    whatever the test reads. Point their handlers at the stream this test starts with."""
    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def make_photo() -> Callable[..., Path]:
    """Write a synthetic photo: make_photo(path, size=(w, h), seed=0, fmt="JPEG", mode=None, **save_params)."""

    def make(path: Path, size=(640, 480), seed=0, fmt="JPEG", mode=None, **params) -> Path:
        image = photo(size, seed)
        if mode:
            image = image.convert(mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, fmt, **params))
        return path

    return make


@pytest.fixture
def good_folder(tmp_path, make_photo) -> Path:
    """Six distinct, valid photos."""
    folder = tmp_path / "photos"
    for i in range(6):
        make_photo(folder / f"img{i}.jpg", seed=100 + i)
    return folder


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A writable copy of the bundled demo photos."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO_PHOTOS, target)
    return target


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect database and API for every flow test (slow to start: share it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def builtin_models_home(tmp_path_factory) -> Path:
    """Build tiny models once per session, in a temporary home (subprocesses inherit it)."""
    home = tmp_path_factory.mktemp("subject-lora-home")
    os.environ["SUBJECT_LORA_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def blip_captioner(builtin_models_home):
    """One loaded tiny BLIP for every test that captions in-process."""
    from lora_core.dataset.blip import BlipCaptioner

    captioner = BlipCaptioner(TINY_BLIP, device="cpu")
    captioner.load()
    return captioner


@pytest.fixture
def count_blip(monkeypatch) -> list[int]:
    """Count the images BLIP's generate is called on (one entry per call: its batch size)."""
    from transformers import BlipForConditionalGeneration

    calls: list[int] = []
    real = BlipForConditionalGeneration.generate

    def counted(self, pixel_values, *args, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        return real(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", counted)
    return calls


@pytest.fixture(scope="session")
def portraits() -> dict[str, Image.Image]:
    """Real public-domain portraits that ship with the project and its test tools.

    `astronaut` is NASA's portrait of Eileen Collins (scikit-image's sample);
    `obama-*` are official White House photos from the demo set (demo/CREDITS.md).
    """
    from skimage.data import astronaut

    images = {"astronaut": Image.fromarray(astronaut())}
    for name in ("obama-1", "obama-2", "obama-3"):
        with Image.open(DEMO_PHOTOS / f"{name}.jpg") as image:
            images[name] = image.convert("RGB")
    return images


class CountingFaceModels:
    """The real face models, counting the images they detect faces in (to prove caching)."""

    def __init__(self, models) -> None:
        self._models = models
        self.identity = models.identity
        self.detections = 0

    def detect(self, rgb, *args, **kwargs):
        self.detections += 1
        return self._models.detect(rgb, *args, **kwargs)

    def chip(self, *args, **kwargs):
        return self._models.chip(*args, **kwargs)

    def descriptor(self, *args, **kwargs):
        return self._models.descriptor(*args, **kwargs)


@pytest.fixture
def counting_faces() -> CountingFaceModels:
    from lora_core.checks.face_models import face_models

    return CountingFaceModels(face_models())


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _started(stat: Path) -> int:
    """A process's start time, in clock ticks since boot (/proc's `starttime`)."""
    return int(stat.read_text().rsplit(")", 1)[1].split()[19])


def leftover_processes() -> list[str]:
    """Processes of this job (our process group) that are not pytest or what started it: a test's
    subprocess, a Prefect server it left behind. Linux only (empty elsewhere)."""
    group, mine, found = os.getpgrp(), _ancestors(), []
    since = _started(Path(f"/proc/{os.getpid()}/stat"))  # processes older than pytest are not the tests'
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
            # Started by the tests: pytest's children, or orphans (their parent gone, not a shell of ours
            # that also started a sibling of pytest, such as `| grep`).
            parent = int(fields[1])
            ours = int(fields[2]) == group and pid not in mine and int(fields[19]) >= since
            ours = ours and (parent == os.getpid() or parent not in mine)
            if ours and fields[0] != "Z":
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid}: {command[:160]}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`make test` leaves no process behind: whatever a test started must be gone when the tests end."""
    # The fork server of the check stages' workers (lora_core.checks.workers), and its resource tracker, are
    # pytest's own, like its threads: they end with pytest, as they end with the command line. Stopped here, so
    # that what is counted is what the tests started and left.
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import time

    getattr(multiprocessing.forkserver._forkserver, "_stop", lambda: None)()
    getattr(multiprocessing.resource_tracker._resource_tracker, "_stop", lambda: None)()  # the server's tracker
    deadline = time.monotonic() + 15  # a server being stopped gets its moment
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        print("\nprocesses left behind by the tests:\n  " + "\n  ".join(left), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
