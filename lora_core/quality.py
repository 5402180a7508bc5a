"""Crop and quality: what the seed's author checks photo by photo before training.

"No low-res or pixelated images", "never upscale", portraits with the face
clear and whole, and only the subject. Each check is a number with a plain
definition, recorded in the manifest; a flag is raised against a threshold
(`CheckSettings`), and blur is judged relative to the rest of the set, since
what counts as sharp depends on the camera.

Image measures, on the grey image:

- sharpness: variance of the Laplacian (on the face, resized to a fixed
  size, for a person; on the whole image otherwise);
- pixelation: share of the horizontal and vertical edge energy that sits on a
  single grid of block boundaries (nearest-neighbour enlargement puts it all
  there; a photo spreads it evenly);
- JPEG blockiness: edge strength on the 8-pixel grid over that inside blocks;
- upscaling: resampling an image leaves a periodic pattern in its second
  derivative (Gallagher 2005); its peak over the spectrum's median is the
  score. Downscaling leaves one too, so an image is called upscaled only when
  its top frequency band is also nearly empty. A 2x enlargement puts its
  pattern at the Nyquist frequency, where JPEG's grid also lives: such images
  are usually caught as blurred instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel
from rich.progress import Progress
from scipy.ndimage import laplace

from lora_core import faces as faces_module
from lora_core.faces import FaceModels, face_models
from lora_core.fs import JsonCache, atomic_write_text, content_stamp, sha256_file, source_version, stamp_matches
from lora_core.image_store import ImageStore
from lora_core.layout import SubjectLayout
from lora_core.manifest import manifest_rows, write_manifest
from lora_core.settings import CheckSettings, QualityPolicy, SubjectType

__all__ = [
    "QUALITY_FLAGS",
    "QualityResult",
    "blockiness",
    "check_quality",
    "count_guidance",
    "framing",
    "high_frequency_share",
    "identity_distances",
    "pixelation",
    "quality_intact",
    "quality_stamp",
    "sharpness",
    "upscale_signature",
]

# Flags the quality policy acts on (orientation's own flags are not among them).
QUALITY_FLAGS = (
    "no_face",
    "other_faces",
    "face_cut",
    "small_face",
    "blurred",
    "pixelated",
    "jpeg_blocky",
    "upscaled",
    "other_person",
)
_FACE_SIDE = 128  # the face region is resized to this before measuring sharpness (smaller faces: small_face)
_MEASURE_SIDE = 1024  # artifact measures look at most this many pixels along each axis
_UPSCALED_DETAIL = 0.08  # top-band share under which a resampling trace means enlargement
_CODE_VERSION = source_version(__file__, faces_module.__file__)
_MIN_RELATIVE = 3  # fewest images to judge sharpness or identity relative to the set


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: high for crisp edges and texture, near 0 for a blurred image."""
    return float(laplace(grey).var())


def _edge_profiles(grey: np.ndarray) -> list[np.ndarray]:
    """Mean absolute difference across each column boundary, and across each row boundary."""
    return [np.abs(np.diff(grey, axis=axis)).mean(axis=1 - axis) for axis in (1, 0)]


def pixelation(grey: np.ndarray, max_block: int = 32) -> tuple[float, int]:
    """(score, block size): the largest block grid holding nearly all edge energy on both axes.

    Score 0: edges spread evenly, as in a photo; 1: every edge on one grid.
    """
    best = (0.0, 1)
    for block in range(2, max_block + 1):
        excess = []
        for profile in _edge_profiles(grey):
            usable = len(profile) // block * block
            if usable < 4 * block:
                return best
            phases = profile[:usable].reshape(-1, block).sum(axis=0)
            share = phases.max() / max(phases.sum(), 1e-9)
            excess.append((share - 1 / block) / (1 - 1 / block))
        score = min(excess)
        if score >= best[0] - 0.05:  # prefer the larger block: a 2-px grid also holds an 8-px one's edges
            best = (max(score, 0.0), block) if score > 0 else best
    return best


def blockiness(grey: np.ndarray) -> float:
    """JPEG 8x8 blocking: edge strength on the strongest 8-pixel grid over the median inside blocks (~1 clean)."""
    ratios = []
    for profile in _edge_profiles(grey):
        usable = len(profile) // 8 * 8
        if usable < 32:
            return 1.0
        phases = profile[:usable].reshape(-1, 8).mean(axis=0)
        ratios.append(phases.max() / max(float(np.median(phases)), 1e-6))
    return float(np.mean(ratios))


def upscale_signature(grey: np.ndarray, include_nyquist: bool = True) -> tuple[float, float]:
    """(strength, frequency): the periodic trace resampling leaves, on the weaker of the two axes.

    Interpolation makes the second derivative's magnitude vary with the
    position between source pixels, so its per-column mean is periodic; an
    unresampled photo's is not. JPEG's 8-pixel grid is excluded (harmonics of
    1/8), except 1/2, the period of a 2x enlargement, when `include_nyquist`.
    """
    found = []
    for axis in (1, 0):
        signal = np.abs(np.diff(grey, n=2, axis=axis)).mean(axis=1 - axis)
        signal = (signal - signal.mean()) * np.hanning(len(signal))
        spectrum = np.abs(np.fft.rfft(signal))
        freqs = np.fft.rfftfreq(len(signal))
        keep = freqs > 0.05
        for harmonic in (1 / 8, 2 / 8, 3 / 8) + (() if include_nyquist else (4 / 8,)):
            keep &= np.abs(freqs - harmonic) > 0.01
        if keep.sum() < 8:
            return 0.0, 0.0
        peak = int(np.argmax(np.where(keep, spectrum, 0)))
        found.append((float(spectrum[peak] / max(np.median(spectrum[keep]), 1e-9)), float(freqs[peak])))
    return min(found)


def high_frequency_share(grey: np.ndarray) -> float:
    """Power in the top band (0.35-0.5 cycles/px) over a mid band (0.1-0.2), on the weaker axis.

    An enlarged image has almost nothing above its source's Nyquist limit; a
    photo that was only downscaled (as ingest does to large photos) keeps it.
    """
    shares = []
    for axis in (1, 0):
        power = (np.abs(np.fft.rfft(grey - grey.mean(axis=axis, keepdims=True), axis=axis)) ** 2).mean(axis=1 - axis)
        freqs = np.fft.rfftfreq(grey.shape[axis])
        mid = power[(freqs >= 0.1) & (freqs < 0.2)].mean()
        shares.append(float(power[freqs >= 0.35].mean() / max(mid, 1e-12)))
    return min(shares)


def framing(face_share: float) -> str:
    """Portrait, half body or full body, from the face's height over the image's."""
    if face_share >= 0.18:
        return "portrait"
    return "half body" if face_share >= 0.07 else "full body"


def count_guidance(count: int) -> str:
    """The seed's table of how many images to train on, for `count` images."""
    if count < 5:
        return f"{count} images: too few; the seed's smallest set that works is 5-10"
    if count <= 10:
        return f"{count} images: enough (the seed: 5-10 works)"
    if count <= 20:
        return f"{count} images: good (the seed: 11-20 is good)"
    if count <= 50:
        return f"{count} images: the best range (the seed: 21-50)"
    if count <= 100:
        return f"{count} images: many; the seed uses 50-100 only for a mix of portraits and full body shots"
    return f"{count} images: more than 100 is a waste of work, in the seed's words; keep the best 20-50"


def identity_distances(descriptors: np.ndarray) -> np.ndarray:
    """Each face descriptor's distance to the set's median face (element-wise median: robust to outliers)."""
    return np.linalg.norm(descriptors - np.median(descriptors, axis=0), axis=1)


class QualityResult(BaseModel):
    """What the `crop` stage found; buckets and captions start from `rows`."""

    token: str
    kept: int
    flagged: int
    rejected: int
    framing: dict[str, int]
    guidance: str
    notes: list[str]
    rows: list[dict]


def check_quality(
    layout: SubjectLayout,
    rows: list[dict],
    settings: CheckSettings,
    subject_type: SubjectType = SubjectType.person,
    *,
    min_images: int = 5,
    models: FaceModels | None = None,
    show_progress: bool = True,
) -> QualityResult:
    """Measure every training image, flag what the seed warns against, apply the policy, update the manifest.

    Starts from the `checks` stage's `rows`. Per-image measures are cached by
    image content; what is judged against the set (sharpness, identity) is
    recomputed on every run. Rejection never leaves fewer than `min_images`.
    """
    stamp = quality_stamp(rows, settings, subject_type, min_images)
    rows = [dict(row) for row in rows]
    store = ImageStore(layout)
    accepted = [row for row in rows if row["status"] == "accepted"]
    person = subject_type == SubjectType.person
    models = (models or face_models()) if person else None
    salt = json.dumps({"models": models.identity if models else subject_type.value, "code": _CODE_VERSION})
    measures = {}
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("crop: quality checks", total=len(accepted))
        for row in accepted:
            store.restore(row)  # a photo an earlier policy set aside comes back to be judged again
            measures[row["image"]] = _measure(layout, layout.root / row["image"], salt, models)
            progress.advance(bar)

    # Sharpness of a face and of a whole image are different numbers: each is judged among its kind.
    medians = {}
    for on_face in (True, False):
        values = [measures[r["image"]]["sharpness"] for r in accepted if ("box" in measures[r["image"]]) == on_face]
        medians[on_face] = float(np.median(values)) if len(values) >= _MIN_RELATIVE else None
    with_face = [row for row in accepted if measures[row["image"]].get("descriptor")]
    distances = {}
    if person and len(with_face) >= _MIN_RELATIVE:
        descriptors = np.array([measures[row["image"]]["descriptor"] for row in with_face])
        distances = dict(zip((r["image"] for r in with_face), identity_distances(descriptors), strict=True))

    for row in accepted:
        measure = measures[row["image"]]
        _judge(row, measure, settings, person, medians["box" in measure], distances.get(row["image"]))
    flagged = [row for row in accepted if set(row["flags"].split(";")) & set(QUALITY_FLAGS)]
    notes = []
    if settings.quality_policy == QualityPolicy.reject and flagged:
        remaining = len(accepted) - len(flagged)
        if remaining < min_images:
            notes.append(
                f"{len(flagged)} flagged image(s) kept: leaving them out would leave {remaining}, "
                f"under the minimum of {min_images}"
            )
        else:
            for row in flagged:
                row["decision"] = "rejected"
                store.set_aside(row)
    write_manifest(layout.manifest, rows)
    atomic_write_text(layout.check_cache / "crop.stamp", stamp)

    kept = [row for row in rows if row["status"] == "accepted"]
    counts = {name: sum(row["framing"] == name for row in kept) for name in ("portrait", "half body", "full body")}
    return QualityResult(
        token=layout.token,
        kept=len(kept),
        flagged=len(flagged),
        rejected=sum(row["decision"] == "rejected" for row in flagged),
        framing=counts if person else {},
        guidance=count_guidance(len(kept)),
        notes=notes + _summaries(flagged),
        rows=rows,
    )


def _measure(layout: SubjectLayout, path: Path, salt: str, models: FaceModels | None) -> dict:
    """Every per-image measure of one training image, cached by its content."""
    sha = sha256_file(path)
    cache = JsonCache(layout.check_cache / "quality", salt)
    if (cached := cache.get(sha)) is not None:
        return cached
    with Image.open(path) as picture:
        image = picture.convert("RGB")
    measure: dict = {"size": list(image.size)}
    region = image
    if models is not None:
        rgb = np.asarray(image)
        faces = models.detect(rgb)
        measure["faces"] = len(faces)
        if faces:
            main = max(faces, key=lambda f: f.width)
            others = [f for f in faces if f is not main and f.width >= 0.1 * main.width]
            measure.update(
                box=list(main.box),
                cut=main.cut_sides(image.size),
                other_widths=[round(f.width / main.width, 3) for f in others],
                descriptor=[round(float(v), 6) for v in models.descriptor(models.chip(rgb, main))],
            )
            left, top, right, bottom = main.box
            pad = 0.2 * main.width
            region = image.crop(
                (
                    max(0, int(left - pad)),
                    max(0, int(top - pad)),
                    min(image.width, int(right + pad)),
                    min(image.height, int(bottom + pad)),
                )
            ).resize((_FACE_SIDE, _FACE_SIDE), Image.Resampling.BICUBIC)
    if region is image:
        scale = 512 / max(image.size)
        region = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    grey = _grey(image)
    top, left = (max(0, (side - _MEASURE_SIDE) // 2) for side in grey.shape)
    grey = grey[top : top + _MEASURE_SIDE, left : left + _MEASURE_SIDE]  # the centre, where the subject is
    block = blockiness(grey)
    strength, frequency = upscale_signature(grey, include_nyquist=block < 1.15)
    pixel_score, pixel_block = pixelation(grey)
    measure.update(
        sharpness=round(sharpness(_grey(region)), 4),
        pixelation=round(pixel_score, 4),
        pixel_block=pixel_block,
        blockiness=round(block, 4),
        upscale=round(strength, 3),
        upscale_frequency=round(frequency, 4),
        detail=round(high_frequency_share(grey), 5),
    )
    cache.put(sha, measure)
    return measure


def _judge(
    row: dict,
    measure: dict,
    settings: CheckSettings,
    person: bool,
    median_sharpness: float | None,
    distance: float | None,
) -> None:
    """Fill `row`'s quality columns and add its flags and plain-word notes."""
    flags = [f for f in row["flags"].split(";") if f]
    notes = [n for n in row["check_notes"].split("; ") if n]
    height = measure["size"][1]

    def flag(code: str, note: str) -> None:
        flags.append(code)
        notes.append(note)

    row.update(
        sharpness=measure["sharpness"],
        pixelation=measure["pixelation"],
        blockiness=measure["blockiness"],
        upscale=measure["upscale"],
    )
    if person:
        row["faces"] = measure["faces"]
        if "box" not in measure:
            flag("no_face", "no face found, at any rotation")
        else:
            left, top, right, bottom = measure["box"]
            row["face_share"] = round((bottom - top) / height, 4)
            row["framing"] = framing(row["face_share"])
            others = [w for w in measure["other_widths"] if w >= settings.other_face_ratio]
            if others:
                flag("other_faces", f"{len(others)} other face(s) in the frame: someone else is in the photo")
            if measure["cut"]:
                flag("face_cut", f"the face is cut by the {' and '.join(measure['cut'])} border")
            if right - left < settings.min_face_px:
                flag("small_face", f"the face is only {right - left} px wide (under {settings.min_face_px})")
            if distance is not None:
                row["identity_distance"] = round(float(distance), 4)
                if distance > settings.identity_distance:
                    flag(
                        "other_person",
                        f"the face differs from the set's (distance {distance:.2f}, over "
                        f"{settings.identity_distance}): is this the same person?",
                    )
    pixelated = measure["pixelation"] >= settings.pixelation_threshold
    upscaled = (
        not pixelated
        and not row["resized"]  # ingest's own downscale leaves a resampling trace of its own
        and measure["upscale"] >= settings.upscale_threshold
        and measure["detail"] < _UPSCALED_DETAIL  # a resampling trace with the top band empty: enlarged
    )
    if pixelated:
        flag("pixelated", f"pixelated: blocks of {measure['pixel_block']} px")
    elif measure["blockiness"] >= settings.blockiness_threshold:
        flag("jpeg_blocky", f"JPEG blocks visible (blockiness {measure['blockiness']:.2f})")
    if upscaled:
        frequency = measure["upscale_frequency"]
        flag("upscaled", f"looks upscaled: a resampling pattern repeats every {1 / frequency:.1f} px (never upscale)")
    if median_sharpness and not pixelated:
        relative = measure["sharpness"] / median_sharpness
        if relative < settings.blur_ratio and not upscaled:
            flag("blurred", f"blurred: {relative:.0%} of the set's median sharpness")
    row.update(flags=";".join(flags), check_notes="; ".join(notes))


def _summaries(flagged: list[dict]) -> list[str]:
    """One line per kind of problem, naming the photos: what to look at first."""
    words = {
        "no_face": "have no face found",
        "other_faces": "show someone else too",
        "face_cut": "have the face cut by the border",
        "small_face": "have a face too small to learn from",
        "blurred": "look blurred",
        "pixelated": "look pixelated",
        "jpeg_blocky": "show JPEG blocks",
        "upscaled": "look upscaled",
        "other_person": "may show another person",
    }
    lines = []
    for code, text in words.items():
        names = [row["source"] for row in flagged if code in row["flags"].split(";")]
        if names:
            lines.append(f"{len(names)} image(s) {text}: {', '.join(names)}")
    return lines


def quality_stamp(rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int) -> str:
    """What the `crop` stage's output is made from: the checks' rows, the settings, the code."""
    images = [(row["source"], row["status"], row.get("image", ""), row.get("checked_sha256", "")) for row in rows]
    return content_stamp([images, settings.model_dump(mode="json"), subject_type.value, min_images, _CODE_VERSION])


def quality_intact(
    layout: SubjectLayout, rows: list[dict], settings: CheckSettings, subject_type: SubjectType, min_images: int = 5
) -> bool:
    """True when the crop stage ran on these `rows` with these settings and its measures are in the manifest."""
    if not stamp_matches(layout.check_cache / "crop.stamp", quality_stamp(rows, settings, subject_type, min_images)):
        return False
    try:
        rows = manifest_rows(layout.manifest)
    except Exception:
        return False
    return all(row["sharpness"] is not None for row in rows if row["status"] == "accepted")
