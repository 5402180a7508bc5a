"""Ingest killed or failing mid-swap never loses an edited caption nor pairs it with another photo.

A re-ingest renumbers the images and carries each caption to its photo's new
number, then swaps the new class folder in (`lora_core.dataset.ingest_swap`). Here it
is stopped at each dangerous point: a hard kill (`os._exit` in a subprocess,
so no `finally` runs) or an exception; the state left, and the next run of
the same command, must keep every caption beside its own photo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core.dataset.ingest import ingest
from lora_core.dataset.manifest import read_manifest
from lora_core.foundation.layout import SubjectLayout
from tests.conftest import ROOT, encode, photo

TOKEN = "t0k3n"
# Where a re-ingest is stopped: its captions carried into staging; its old class folder moved to
# staging's previous/; its new class folder renamed into place (the manifest not yet rewritten).
POINTS = ("carried", "previous", "swapped")
KILLED = 137


class Interrupted(RuntimeError):
    """The error raised at a stop point."""


def arm(point: str, fire: Callable[[], None], patch: Callable[[object, str, object], None] = setattr) -> None:
    """Make ingest call `fire()` once it has passed `point` (`patch` is setattr or a monkeypatch's).

    The swap's folder moves are `Path.rename`; should they stop being, the stop
    point is never reached and the tests say so rather than pass.
    """
    import lora_core.dataset.ingest

    if point == "carried":
        carry = lora_core.dataset.ingest._carry_sidecars

        def carried(*args: object, **kwargs: object) -> None:
            carry(*args, **kwargs)
            fire()

        patch(lora_core.dataset.ingest, "_carry_sidecars", carried)
        return
    rename = Path.rename

    def renamed(self: Path, target: str | os.PathLike) -> Path:
        done = rename(self, target)
        target = Path(target)
        if point == "previous" and target.parent.name == "previous":
            fire()
        if point == "swapped" and self.parent.name.startswith(".ingest-") and target.parent.name == "training_images":
            fire()
        return done

    patch(Path, "rename", renamed)


def make_photos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(encode(photo((288, 256), seed=sum(map(ord, name)))))


def run(photos: Path, workdir: Path, num_repeats: int | None = None) -> None:
    ingest(photos, SubjectLayout(workdir, TOKEN), show_progress=False, workers=1, num_repeats=num_repeats)


def accepted(subject: Path) -> dict[str, Path]:
    """Each accepted photo's source name -> its image on disk, as the manifest on disk says."""
    frame = read_manifest(subject / "manifest.csv")
    return {row.source: subject / row.image for row in frame[frame["status"] == "accepted"].itertuples()}


def captions_in_place(subject: Path, photos: Path, captions: dict[str, str]) -> None:
    """Every caption beside its own photo: the manifest's image is that photo's pixels, its .txt the caption."""
    images = accepted(subject)
    for source, image in images.items():
        with Image.open(photos / source) as original, Image.open(image) as written:
            assert np.array_equal(np.asarray(original.convert("RGB")), np.asarray(written)), (source, image)
        caption = image.with_suffix(".txt")
        if source in captions:
            assert caption.read_text() == captions[source], (source, image)
        else:
            assert not caption.exists(), f"{source} got a caption: {caption.read_text()!r}"
    assert set(captions) <= set(images)
    training = subject / "training_images"
    assert [p.name for p in training.iterdir() if p.is_dir() and p.name.endswith(f"_{TOKEN}")] == [
        next(iter(images.values())).parent.name
    ]


def prepare(photos: Path, workdir: Path, num_repeats: int | None) -> dict[str, str]:
    """Six photos ingested, each given its own edited caption; then a photo that sorts first is added."""
    run(photos, workdir, num_repeats)
    captions = {}
    for source, image in accepted(workdir / TOKEN).items():
        captions[source] = f"edited caption of {source}"
        image.with_suffix(".txt").write_text(captions[source])
    make_photos(photos, ["aaa-first.jpg"])  # sorts before every other: renumbers them all
    return captions


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from tests.resilience.test_ingest_kill import arm, run
arm(sys.argv[1], lambda: os._exit(137))
run(Path(sys.argv[2]), Path(sys.argv[3]), None if sys.argv[4] == "auto" else int(sys.argv[4]))
"""


@pytest.mark.parametrize("num_repeats", [None, 10], ids=["folder-renamed", "same-folder"])
@pytest.mark.parametrize("point", POINTS)
def test_killed_reingest_then_rerun_keeps_each_caption_beside_its_photo(tmp_path, point, num_repeats):
    photos, workdir = tmp_path / "photos", tmp_path / "work"
    make_photos(photos, [f"img{i}.jpg" for i in range(6)])
    captions = prepare(photos, workdir, num_repeats)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [point, str(photos), str(workdir), "auto" if num_repeats is None else str(num_repeats)]
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == KILLED, f"the kill point {point} was never reached:\n{done.stderr}"

    run(photos, workdir, num_repeats)
    subject = workdir / TOKEN
    captions_in_place(subject, photos, captions)
    assert len(accepted(subject)) == 7
    assert not list((subject / "training_images").glob(".ingest-*"))


@pytest.mark.parametrize("point", POINTS)
def test_error_mid_reingest_leaves_each_caption_beside_its_photo(tmp_path, monkeypatch, point):
    photos, workdir = tmp_path / "photos", tmp_path / "work"
    make_photos(photos, [f"img{i}.jpg" for i in range(6)])
    captions = prepare(photos, workdir, None)
    subject = workdir / TOKEN

    def fire() -> None:
        raise Interrupted(point)

    with monkeypatch.context() as patched:
        arm(point, fire, patched.setattr)
        with pytest.raises(Interrupted):
            run(photos, workdir)
    captions_in_place(subject, photos, captions)  # after the error: old layout or new, never a mix
    assert not list((subject / "training_images").glob(".ingest-*"))

    run(photos, workdir)
    captions_in_place(subject, photos, captions)
    assert len(accepted(subject)) == 7
