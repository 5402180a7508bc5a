"""Photos people actually have: iPhone HEIC and AVIF upright, and a phone's worth of photos on every core."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lora_core.checks.workers as workers
import lora_core.dataset.ingest
import lora_core.dataset.orient
import lora_core.foundation.sources
from lora_core.checks.workers import photo_workers, run_per_photo, usable_cores
from lora_core.config.settings import CheckSettings, IngestSettings
from lora_core.dataset.crop import crop_subject
from lora_core.dataset.decoding import decode_image
from lora_core.dataset.ingest import ingest
from lora_core.dataset.orient import orient_subject
from lora_core.foundation.layout import SubjectLayout
from tests.conftest import encode, photo
from tests.unit.test_orient import crops

FAST = {"HEIF": {"enc_params": {"preset": "ultrafast"}}, "AVIF": {"speed": 10}}  # x265 and aom, quickest


def phone_file(image: Image.Image, fmt: str, orientation: int = 1, **params) -> bytes:
    """`image` as a phone writes it: HEIC (pillow-heif, x265) or AVIF (Pillow, aom), EXIF orientation set."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), quality=90, **FAST[fmt], **params)


def marked(seed: int) -> Image.Image:
    """A landscape photo as the sensor stored it, a red square in its top-left corner."""
    stored = photo((480, 360), seed)
    stored.paste((255, 0, 0), (0, 0, 60, 60))
    return stored


# How each EXIF orientation is shown: the stored pixels turned (and mirrored) once.
SHOWN = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_270),  # 90 degrees clockwise: an iPhone held upright
    8: lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_are_decoded_upright_and_turned_once(fmt, orientation):
    stored = marked(orientation)
    decoded = decode_image(phone_file(stored, fmt, orientation), IngestSettings())
    expected = np.asarray(SHOWN[orientation](stored), dtype=np.int16)
    pixels = np.asarray(decoded.image, dtype=np.int16)
    assert decoded.source_format == fmt and decoded.image.mode == "RGB"
    assert decoded.exif_rotated is (orientation != 1)
    assert pixels.shape == expected.shape
    # A lossy codec: close to the stored photo shown as its orientation says, far from every other way.
    assert np.abs(pixels - expected).mean() < 6
    for other, show in SHOWN.items():
        wrong = np.asarray(show(stored), dtype=np.int16)
        if other != orientation and wrong.shape == pixels.shape:
            assert np.abs(pixels - wrong).mean() > 20, f"shown as orientation {other}"
    red = [(y, x) for y in (slice(5, 50), slice(-50, -5)) for x in (slice(5, 50), slice(-50, -5))]
    corners = [pixels[y, x, 0].mean() > 200 and pixels[y, x, 1].mean() < 70 for y, x in red]
    assert sum(corners) == 1, "the marker is in exactly one corner"


def test_an_iphone_style_heic_keeps_its_colours_and_depth():
    """10-bit HEIC (an iPhone's HDR photo) comes in as 8-bit RGB; a transparent HEIC is flattened on white."""
    import pillow_heif

    source = photo((320, 280), 5)
    deep = pillow_heif.from_bytes(
        mode="RGB;16", size=source.size, data=(np.asarray(source).astype(np.uint16) << 8).tobytes()
    )
    buffer = io.BytesIO()
    deep.save(buffer, quality=95, **FAST["HEIF"])
    assert Image.open(io.BytesIO(buffer.getvalue())).info["bit_depth"] == 10
    decoded = decode_image(buffer.getvalue(), IngestSettings())
    assert decoded.image.mode == "RGB"
    assert abs(np.asarray(decoded.image, dtype=float).mean() - np.asarray(source, dtype=float).mean()) < 3

    rgba = source.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 100, 100))
    flat = np.asarray(decode_image(encode(rgba, "HEIF", **FAST["HEIF"]), IngestSettings()).image)
    assert flat[10:90, 10:90].min() > 240, "transparency is flattened onto white"


def test_a_phone_folder_and_its_zip_are_ingested(tmp_path, make_photo):
    folder = tmp_path / "DCIM"
    (folder / "100APPLE").mkdir(parents=True)
    files = {
        "100APPLE/IMG_0001.HEIC": phone_file(marked(1), "HEIF", 6),
        "100APPLE/IMG_0002.heic": phone_file(photo((480, 360), 2), "HEIF"),
        "IMG_0003.HEIF": phone_file(photo((400, 400), 3), "HEIF"),
        "IMG_0004.avif": phone_file(photo((360, 480), 4), "AVIF"),
        "IMG_0005.AVIF": phone_file(marked(5), "AVIF", 8),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    make_photo(folder / "IMG_0006.JPG", seed=6)
    (folder / "100APPLE" / "IMG_0001.txt").write_text("at the beach")
    with zipfile.ZipFile(tmp_path / "DCIM.zip", "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())

    for n, source in enumerate((folder, tmp_path / "DCIM.zip")):
        result = ingest(source, SubjectLayout(tmp_path / f"work{n}", "ph0ne"), show_progress=False)
        rows = {row["source"]: row for row in result.rows}
        assert result.accepted == 6, [(r["source"], r["reason"]) for r in result.rows]
        assert {rows[name]["source_format"] for name in files} == {"HEIF", "AVIF"}
        first = rows["100APPLE/IMG_0001.HEIC"]
        assert first["exif_rotated"] and (first["width"], first["height"]) == (360, 480)
        assert first["user_caption"] == "at the beach"
        assert rows["IMG_0005.AVIF"]["exif_rotated"] and (rows["IMG_0005.AVIF"]["width"] == 360)
        assert Image.open(result.subject_dir / first["image"]).size == (360, 480)


def test_a_broken_heic_is_a_reason_not_a_crash(tmp_path, good_folder):
    data = phone_file(photo((480, 360), 9), "HEIF")
    (good_folder / "cut.heic").write_bytes(data[: len(data) // 2])
    (good_folder / "empty-box.heic").write_bytes(data[:40])
    result = ingest(good_folder, SubjectLayout(tmp_path / "work", "ph0ne"), show_progress=False)
    rows = {row["source"]: row for row in result.rows}
    for name in ("cut.heic", "empty-box.heic"):
        assert rows[name]["status"] == "rejected"
        assert any(word in rows[name]["reason"] for word in ("corrupt", "truncated", "not an image")), rows[name]
    assert result.accepted == 6


# --- a phone's worth of photos on every core ------------------------------------------------------


@pytest.fixture
def messy_folder(good_folder, make_photo) -> Path:
    """Good photos plus what a real folder holds: copies, a re-encode, a caption, junk, a HEIC."""
    (good_folder / "zz-copy.jpg").write_bytes((good_folder / "img0.jpg").read_bytes())
    (good_folder / "aa-copy.jpg").write_bytes((good_folder / "img3.jpg").read_bytes())
    make_photo(good_folder / "img1-again.webp", seed=101, fmt="WEBP", quality=60)
    (good_folder / "img2.txt").write_text("a caption")
    (good_folder / "junk.jpg").write_bytes(b"not a photo")
    (good_folder / "IMG_0100.HEIC").write_bytes(phone_file(marked(100), "HEIF", 6))
    for i in range(6, 12):
        make_photo(good_folder / f"more{i}.jpg", size=(520, 390), seed=200 + i)
    return good_folder


def _outputs(workdir: Path) -> dict[str, bytes]:
    return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_ingest_on_two_threads_writes_what_one_does(tmp_path, messy_folder, monkeypatch):
    decoders: list[str] = []
    decode = lora_core.dataset.ingest.decode_image

    def decode_and_note(data, settings):
        decoders.append(f"{os.getpid()}:{threading.current_thread().name}")
        time.sleep(0.02)  # long enough for the other thread to take the next photo
        return decode(data, settings)

    monkeypatch.setattr(lora_core.dataset.ingest, "decode_image", decode_and_note)
    one = ingest(messy_folder, SubjectLayout(tmp_path / "one", "t0k3n"), show_progress=False, workers=1)
    here = f"{os.getpid()}:{threading.current_thread().name}"
    assert set(decoders) == {here}
    decoders.clear()
    two = ingest(messy_folder, SubjectLayout(tmp_path / "two", "t0k3n"), show_progress=False, workers=2)
    assert len(set(decoders)) == 2 and here not in decoders, "two worker threads decoded the photos"
    assert one.rows == two.rows
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two"), "same images, names and manifest"
    reasons = {row["source"]: row["reason"] for row in two.rows}
    assert reasons["zz-copy.jpg"] == "exact duplicate of img0.jpg"
    assert reasons["img3.jpg"] == "exact duplicate of aa-copy.jpg"
    photos = [path for path in messy_folder.iterdir() if path.suffix != ".txt"]
    assert len(decoders) == len(photos) - 2, "the two exact copies are never decoded"


def test_every_photo_is_reported_as_it_is_done(tmp_path, messy_folder):
    reports: list[tuple[str, int, int, str]] = []
    on_photo = lambda name, done, total: reports.append((name, done, total, threading.current_thread().name))  # noqa: E731
    result = ingest(messy_folder, SubjectLayout(tmp_path / "w", "t0k3n"), show_progress=False, on_photo=on_photo)
    photos = sorted(row["source"] for row in result.rows if row["source"] != "img2.txt")
    assert sorted(name for name, *_ in reports) == photos, "each photo once; the caption file is not a photo"
    assert [done for _, done, _, _ in reports] == list(range(1, len(photos) + 1))
    assert {total for _, _, total, _ in reports} == {len(photos)}
    assert {thread for *_, thread in reports} == {threading.current_thread().name}, "told in the caller's thread"


def test_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not loaded
    assert usable_cores() == 4
    fake_torch = type("torch", (), {"get_num_threads": staticmethod(lambda: 2)})
    monkeypatch.setitem(sys.modules, "torch", fake_torch)  # share_cores gave this run 2 threads
    assert usable_cores() == 2
    assert photo_workers(100) == 2 and photo_workers(3) == 1 and photo_workers(100, workers=1) == 1


def _square_and_pid(value: int) -> tuple[int, int]:
    if value < 0:
        raise ValueError(f"negative: {value}")
    time.sleep(0.01 * (value % 3))  # finish out of order
    return value * value, os.getpid()


def _meet_then_square(item: tuple[int, str]) -> tuple[int, int]:
    """`_square_and_pid`, once two workers have each noted their pid in the folder (or 60 s passed): a worker
    that starts late (it imports this module first) still gets its share, so the test sees both."""
    value, folder = item
    (Path(folder) / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return _square_and_pid(value)


def _square_alone(item: tuple[int, str]) -> tuple[int, int]:
    return _square_and_pid(item[0])


def test_run_per_photo_uses_worker_processes_and_keeps_the_order(tmp_path):
    work = _meet_then_square if workers._can_use_processes() else _square_alone  # no waiting for a second one
    results = dict(run_per_photo(work, [(i, str(tmp_path)) for i in range(12)], workers=2))
    assert [results[i][0] for i in range(12)] == [i * i for i in range(12)]
    pids = {pid for _, pid in results.values()}
    if workers._can_use_processes():
        assert len(pids) == 2 and os.getpid() not in pids
    here = dict(run_per_photo(_square_and_pid, [1, 2], workers=1))
    assert {pid for _, pid in here.values()} == {os.getpid()}
    with pytest.raises(ValueError, match="negative: -1"):
        list(run_per_photo(_square_and_pid, [1, 2, -1, 3, 4, 5], workers=2))


def _parent_pid(_: int) -> int:
    return os.getppid()


@pytest.mark.skipif(not workers._can_use_processes(), reason="no fork server on this platform")
def test_worker_processes_are_not_forks_of_this_process():
    """Forked beside Prefect's threads, a worker could inherit a lock one of them held; the workers come from
    the fork server, a process without those threads: their parent is not this process."""
    parents = {parent for _, parent in run_per_photo(_parent_pid, list(range(8)), workers=2)}
    assert os.getpid() not in parents and len(parents) == 1, parents


@pytest.mark.skipif(not workers._can_use_processes(), reason="no worker processes on this platform")
def test_worker_processes_do_not_run_the_command_line_s_module_again():
    """`python -m flows.train_subject` imports torch, Prefect and every stage: a check worker needs none of it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.worker_main"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False]", done.stdout + done.stderr


def test_run_per_photo_takes_items_a_few_ahead_of_the_workers():
    """A generator that reads files is read only as far as the workers have work in hand."""
    pulled: list[int] = []

    def items():
        for value in range(40):
            pulled.append(value)
            yield value

    results = run_per_photo(_square_and_pid, items(), workers=2, count=40)
    first, _ = next(results)
    if workers._can_use_processes():
        assert len(pulled) <= workers.IN_FLIGHT_PER_WORKER * 2, "only the items in flight were read"
    assert sorted([first, *(index for index, _ in results)]) == list(range(40))


@pytest.fixture(scope="module")
def portrait_set(tmp_path_factory, portraits):
    """Six framings of a real portrait, two mirrored, one sideways; ingested twice (a layout per run)."""
    root = tmp_path_factory.mktemp("portraits")
    photos = root / "photos"
    photos.mkdir()
    for i, crop in enumerate(crops(portraits["astronaut"], 6, seed=11)):
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i in (1, 4) else crop
        (crop.transpose(Image.Transpose.ROTATE_90) if i == 5 else crop).save(photos / f"p{i}.png")
    layouts = [SubjectLayout(root / f"work{n}", "p0rtra1t") for n in (1, 2)]
    rows = [ingest(photos, layout, show_progress=False).rows for layout in layouts]
    return layouts, rows


_ANALYSE = lora_core.dataset.orient._analyse


def _analyse_and_note(path: Path, models):
    """orient's `_analyse`, noting the process it ran in beside the photos' layouts (a worker process gets its
    work pickled by name: this function, from this module, not a closure)."""
    root = next(folder for folder in Path(path).parents if folder.name.startswith("portraits"))
    with open(root / "pids", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if str(os.getpid()) != (root / "test-pid").read_text():  # a worker: wait for the other (see _meet_then_square)
        deadline = time.monotonic() + 60
        while len(set((root / "pids").read_text().split())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return _ANALYSE(path, models)


def test_the_checks_on_worker_processes_find_what_one_process_does(portrait_set, monkeypatch):
    (one, two), (rows_one, rows_two) = portrait_set
    pids = one.root.parents[1] / "pids"
    (one.root.parents[1] / "test-pid").write_text(str(os.getpid()))
    monkeypatch.setattr(lora_core.dataset.orient, "_analyse", _analyse_and_note)
    settings = CheckSettings()
    reports: list[str] = []
    alone = orient_subject(one, rows_one, settings, show_progress=False, workers=1)
    pids.unlink()
    shared = orient_subject(
        two, rows_two, settings, show_progress=False, workers=2, on_photo=lambda name, *_: reports.append(name)
    )
    if workers._can_use_processes():
        seen = set(pids.read_text().split())
        assert len(seen) == 2 and str(os.getpid()) not in seen, "two worker processes analysed the photos"
    assert sorted(reports) == sorted(row["source"] for row in rows_two if row["status"] == "accepted")
    assert alone.rows == shared.rows and alone.notes == shared.notes
    assert shared.rotated >= 1

    crop_alone = crop_subject(one, alone.rows, settings, show_progress=False, workers=1)
    crop_shared = crop_subject(two, shared.rows, settings, show_progress=False, workers=2)
    assert crop_alone.rows == crop_shared.rows and crop_alone.notes == crop_shared.notes


def test_the_ingest_task_shows_its_progress_photo_by_photo(prefect_harness, messy_folder, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import tasks.ingest
    from lora_core.foundation.layout import SubjectLayout

    @flow
    def once():
        task = tasks.ingest.ingest_photos.with_options(cache_policy=None, persist_result=False)
        return task(messy_folder, SubjectLayout(tmp_path / "work", "Pr0gress"), IngestSettings())

    photos = len(once().rows) - 1  # the caption file is not a photo
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pr0gress-ingest-progress"]))
        )
    assert len(artifacts) == 1 and artifacts[0].data == 100
    assert artifacts[0].description.startswith(f"ingest: {photos} of {photos} photos (")
