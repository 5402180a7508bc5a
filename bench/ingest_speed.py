"""Time ingest on a phone's worth of 12-megapixel photos against a plain Pillow loop over the same files.

The photos: `--photos` JPEGs of `--size` (default 200 of 4000x3000, quality
90, a phone's 12 MP), written by the bench into a temporary folder; each has
its own smooth structure (so none is a near-duplicate of another) under the
same sensor-like grain, and every fourth one is a portrait stored sideways with
EXIF orientation 6, as phones store them. Deterministic: the same files every run.

Timed on the same files, one after the other:

- ours: `lora_core.dataset.ingest.ingest` on the folder, whole (listing, hashing,
  decoding on every usable core, upright, 8-bit sRGB, downscaled to 2048 px,
  PNG, perceptual hashes, de-duplication, the layout and the manifest);
- the plain loop (the goal's reference): `Image.open(path).convert("RGB").save(png)`
  per photo, one after another, each PNG deleted once written;
- the same work as ours, plainly: open, `exif_transpose`, convert, resize to
  2048 px, save PNG at ingest's compression, one photo after another: what our
  checks, hashing and threads cost or gain against the bare work;
- that same work on `--pool-photos` photos on a thread pool and on a process
  pool of ingest's worker count: which pool suits this work on this machine.

    python -m bench.ingest_speed                          # 200 photos of 12 MP: about half an hour on 2 cores
    python -m bench.ingest_speed --photos 20 --size 2000x1500
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lora_core.checks.workers import usable_cores
from lora_core.config.settings import IngestSettings
from lora_core.dataset.ingest import ingest
from lora_core.foundation.layout import SubjectLayout

GOAL_RATIO = 0.8  # ours / the plain loop, images per second
_GRAIN_MARGIN = 64  # the grain field is this much larger than a photo; each photo takes its own window


def _grain(size: tuple[int, int]) -> np.ndarray:
    """One field of sensor-like grain (luma), shared by every photo at its own offset."""
    width, height = size
    noise = np.random.default_rng(0).normal(0, 6, (height + _GRAIN_MARGIN, width + _GRAIN_MARGIN))
    return noise.astype(np.int16)


def phone_jpeg(seed: int, size: tuple[int, int], grain: np.ndarray) -> bytes:
    """One photo-like 12 MP JPEG: smooth random structure (its own per seed), grain, EXIF like a phone's."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    top, left = (int(v) for v in rng.integers(0, _GRAIN_MARGIN, 2))
    pixels = np.clip(base + grain[top : top + height, left : left + width, None], 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "bench", "phone 12MP"  # Make, Model
    exif[0x0112] = 6 if seed % 4 == 3 else 1  # a portrait, stored sideways
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` phone JPEGs in `folder`, written on every usable core (not timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    grain = _grain(size)
    paths = [folder / f"IMG_{i:04d}.JPG" for i in range(count)]
    with ThreadPoolExecutor(usable_cores()) as pool:
        for path, data in zip(paths, pool.map(lambda i: phone_jpeg(i, size, grain), range(count)), strict=True):
            path.write_bytes(data)
    return paths


def plain_loop(paths: list[Path], out: Path) -> None:
    """The goal's reference: open, convert to RGB, save as PNG; one photo after another."""
    target = out / "plain.png"
    for path in paths:
        Image.open(path).convert("RGB").save(target, "PNG")
        target.unlink()


def same_work(path: Path, target: Path, long_side: int = 2048) -> None:
    """Ingest's pixel work on one photo, plainly: upright, RGB, at most `long_side`, PNG at its compression."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if max(image.size) > long_side:
        scale = long_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    image.save(target, "PNG", compress_level=4)
    target.unlink()


def _pooled(pool: Executor, paths: list[Path], out: Path) -> None:
    list(pool.map(same_work, paths, [out / f"pool-{i}.png" for i in range(len(paths))]))


def _cpu_seconds() -> float:
    """CPU time of this process (its threads) and of its reaped children (the process pool's workers)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def _phase(result: dict[str, Any], key: str, label: str, photos: int) -> Iterator[None]:
    """Time one way of doing the work: wall seconds, images/s, and the CPU seconds it used.

    CPU seconds over wall seconds is how many cores it kept busy: under 1 for a
    one-photo-at-a-time loop means other work on the machine took its core.
    """
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    result[key] = {
        "photos": photos,
        "seconds": wall,
        "images_per_s": photos / wall,
        "cpu_seconds": cpu,
        "cores_busy": cpu / wall,
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(f"  {label}: {photos} photos in {wall:.1f} s, {cpu:.1f} CPU s ({cpu / wall:.2f} cores)", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = tuple(int(v) for v in args.size.lower().split("x"))
    workers = args.workers or usable_cores()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores",
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "photos": args.photos,
        "size": f"{size[0]}x{size[1]}",
        "workers": workers,
    }
    try:
        started = time.perf_counter()
        paths = make_photos(work / "photos", args.photos, size)  # type: ignore[arg-type]
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"made {len(paths)} photos ({megabytes:.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
        result["load_average_before"] = round(os.getloadavg()[0], 2)

        with _phase(result, "ours", f"ours (ingest, {workers} workers)", len(paths)):
            layout = SubjectLayout(work / "work", "b3nch")
            ingested = ingest(work / "photos", layout, IngestSettings(), show_progress=False, workers=workers)
        result["ours"]["accepted"] = ingested.accepted
        shutil.rmtree(work / "work")

        with _phase(result, "plain", "plain loop", len(paths)):
            plain_loop(paths, work)

        with _phase(result, "same_work", "same work, plainly", len(paths)):
            for i, path in enumerate(paths):
                same_work(path, work / f"same-{i}.png")

        subset = paths[: args.pool_photos]
        fork = multiprocessing.get_context("fork")
        pools = {"threads": ThreadPoolExecutor, "processes": partial(ProcessPoolExecutor, mp_context=fork)}
        for kind, make_pool in pools.items():
            # The pool's start and its workers' exit are inside: the workers' CPU time counts once they are reaped.
            with _phase(result, kind, f"same work, {workers} {kind}", len(subset)), make_pool(workers) as pool:
                _pooled(pool, subset, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["ratio"] = result["ours"]["images_per_s"] / result["plain"]["images_per_s"]
    result["ratio_same_work"] = result["ours"]["images_per_s"] / result["same_work"]["images_per_s"]
    return result


def report(result: dict[str, Any]) -> str:
    """The figures as a small markdown table and a few lines (what RESULTS.md keeps)."""
    rows = [
        ("ours: `ingest` (whole stage)", result["ours"]),
        ("plain loop: open, convert, save PNG (full size)", result["plain"]),
        ("same work as ours, plainly, one photo at a time", result["same_work"]),
        (f"same work, thread pool of {result['workers']}", result["threads"]),
        (f"same work, process pool of {result['workers']}", result["processes"]),
    ]
    met = "yes" if result["ratio"] >= GOAL_RATIO else "NO"
    one_at_a_time = result["same_work"]["images_per_s"]
    threads, processes = (result[pool]["images_per_s"] / one_at_a_time for pool in ("threads", "processes"))
    cpu_per_photo = {key: result[key]["cpu_seconds"] / result[key]["photos"] for key in ("ours", "plain")}
    lines = [
        f"machine: {result['machine']}; Python {result['python']}, Pillow {result['pillow']}; "
        f"load average {result['load_average_before']} before",
        f"{result['photos']} JPEG photos of {result['size']}; ingest on {result['workers']} worker(s); "
        f"{result['ours']['accepted']} accepted",
        "",
        "| | photos | s | images/s | CPU s | cores busy | load average after |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['photos']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {r['cpu_seconds']:.1f} "
            f"| {r['cores_busy']:.2f} | {r['load_average_after']} |"
            for name, r in rows
        ),
        "",
        f"ratio ours/plain loop (images/s): {result['ratio']:.2f} (goal >= {GOAL_RATIO}: {met})",
        f"CPU s per photo: ours {cpu_per_photo['ours']:.2f}, plain loop {cpu_per_photo['plain']:.2f}",
        f"ratio ours/same work plainly: {result['ratio_same_work']:.2f}",
        f"the same work on {result['workers']} workers, against one at a time: threads {threads:.2f}x, "
        f"processes {processes:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photos; default 4000x3000 (12 MP)")
    parser.add_argument("--workers", type=int, default=None, help="ingest's threads (default: every usable core)")
    parser.add_argument("--pool-photos", type=int, default=40, help="photos for the thread/process pool comparison")
    args = parser.parse_args(argv)
    if args.photos < IngestSettings().min_images or args.pool_photos < 1:
        parser.error(f"want at least {IngestSettings().min_images} photos (ingest's minimum) and 1 pool photo")
    result = run(args)
    print(report(result))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-ingest-speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
