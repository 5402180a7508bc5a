"""Time the dataset checks (stages `checks` and `crop`) on 50 real photos of 512-1024 px.

The issue's bar: the whole stage in under a minute on a 2-core machine. The
plain reference does the same face work the straightforward way, on the same
photos in the same run: detection on the full image at all four rotations,
upsampled once (to find small faces), then landmarks and the descriptor.

    python -m bench.bench_checks            # prints timings and the ratio
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lora_core.checks.face_models import face_models
from lora_core.config.settings import CheckSettings, IngestSettings
from lora_core.dataset.crop import crop_subject
from lora_core.dataset.ingest import ingest
from lora_core.dataset.orient import orient_subject, turn
from lora_core.foundation.layout import SubjectLayout

DEMO = Path(__file__).resolve().parent.parent / "demo" / "photos"


def make_photos(folder: Path, count: int, seed: int = 0) -> None:
    """`count` different framings of real portraits, 512-1024 px on the long side, a few mirrored."""
    from skimage.data import astronaut

    sources = [Image.fromarray(astronaut())] + [Image.open(DEMO / f"obama-{i}.jpg").convert("RGB") for i in (1, 2, 3)]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[i % len(sources)]
        width = int(source.width * rng.uniform(0.6, 1.0))
        height = int(source.height * rng.uniform(0.55, 0.95))
        left = int(rng.integers(0, source.width - width + 1))
        top = int(rng.integers(0, (source.height - height) // 3 + 1))
        crop = source.crop((left, top, left + width, top + height))
        long_side = int(rng.integers(512, 1025))
        long_side = max(
            long_side, -(-300 * max(crop.size) // min(crop.size))
        )  # short side >= 300 (ingest's floor: 256)
        scale = long_side / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
        if i % 7 == 3:
            crop = turn(crop, 0, mirror=True)
        crop.save(folder / f"photo-{i:03d}.png")


def plain_reference(layout: SubjectLayout, rows: list[dict]) -> None:
    """The face work done the obvious way: every rotation, full size, upsampled once."""
    models = face_models()
    detector = models._detector  # the same dlib models, without our shortcuts
    for row in rows:
        if row["status"] != "accepted":
            continue
        image = Image.open(layout.root / row["image"]).convert("RGB")
        best = None
        for rotation in (0, 90, 180, 270):
            rgb = np.asarray(turn(image, rotation))
            rects, scores, _ = detector.run(rgb, 1, 0.0)
            if rects and (best is None or scores[0] > best[0]):
                best = (scores[0], rgb)
        if best is not None:
            faces = models.detect(best[1], max_side=10_000)
            if faces:
                chip = models.chip(best[1], faces[0])
                models.descriptor(chip)
                models.descriptor(chip[:, ::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    try:
        make_photos(work / "photos", args.images)
        layout = SubjectLayout(work / "work", "bench")
        # Crops of four photos are near-duplicates to ingest's perceptual hash; keep them all here.
        ingested = ingest(work / "photos", layout, IngestSettings(near_duplicate_distance=0), show_progress=False)
        accepted = sum(row["status"] == "accepted" for row in ingested.rows)
        face_models()  # loading (0.5 s) is not part of either side

        start = time.perf_counter()
        checked = orient_subject(layout, ingested.rows, CheckSettings(), show_progress=False)
        cropped = crop_subject(layout, checked.rows, CheckSettings(), show_progress=False)
        ours = time.perf_counter() - start

        start = time.perf_counter()
        orient_subject(layout, ingested.rows, CheckSettings(), show_progress=False)
        crop_subject(layout, checked.rows, CheckSettings(), show_progress=False)
        cached = time.perf_counter() - start

        start = time.perf_counter()
        plain_reference(layout, ingested.rows)
        plain = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"photos: {accepted} accepted of {args.images} (512-1024 px); {checked.mirrored} flagged mirrored")
    print(f"checks + crop, first run:       {ours:6.1f} s  ({ours / accepted:.2f} s per photo)")
    print(f"checks + crop, again (cached):  {cached:6.1f} s")
    print(f"plain reference (face work only): {plain:6.1f} s")
    print(f"ratio plain / ours: {plain / ours:.2f}x")
    print(f"under a minute: {'yes' if ours < 60 else 'NO'}; {cropped.flagged} photos flagged by the quality checks")


if __name__ == "__main__":
    main()
