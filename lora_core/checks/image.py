"""Image checks: "No low-res or pixelated images" and "never upscale", on any subject.

Measures, on the grey image:

- sharpness: variance of the Laplacian (on the face, resized to a fixed
  size, for a person; on the whole image otherwise), judged against the
  set's median, since what counts as sharp depends on the camera;
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

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from scipy.ndimage import laplace

from lora_core.checks.base import MIN_RELATIVE, Check, Column, Finding, Photo, Sample

__all__ = [
    "BLURRED",
    "JPEG_BLOCKY",
    "PIXELATED",
    "UPSCALED",
    "ImageSettings",
    "blockiness",
    "grey",
    "high_frequency_share",
    "pixelation",
    "sharpness",
    "upscale_signature",
]

_FACE_SIDE = 128  # the face region is resized to this before measuring sharpness (smaller faces: small_face)
_UPSCALED_DETAIL = 0.08  # top-band share under which a resampling trace means enlargement


class ImageSettings(BaseModel):
    """Thresholds of the image checks."""

    blur_ratio: float = Field(
        0.3, gt=0, lt=1, description="Flag as blurred below this fraction of the set's median sharpness."
    )
    pixelation_threshold: float = Field(
        0.8, gt=0, le=1, description="Share of the edge energy on a block grid above which an image is pixelated."
    )
    blockiness_threshold: float = Field(
        1.4, gt=1, description="JPEG blockiness: edge strength on the 8-pixel grid over that inside the blocks."
    )
    upscale_threshold: float = Field(
        15.0, gt=1, description="Strength of the periodic interpolation pattern above which an image looks upscaled."
    )


def grey(image: Image.Image) -> np.ndarray:
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


# Pixelation


def _measure_pixelation(sample: Sample) -> dict:
    score, block = pixelation(sample.centre)
    return {"pixelation": round(score, 4), "pixel_block": block}


def _pixelated(measure: dict, settings: ImageSettings) -> bool:
    return measure["pixelation"] >= settings.pixelation_threshold


def _judge_pixelation(photo: Photo, settings: ImageSettings) -> Finding:
    measure = photo.measure
    note = f"pixelated: blocks of {measure['pixel_block']} px" if _pixelated(measure, settings) else None
    return Finding({"pixelation": measure["pixelation"]}, note)


PIXELATED = Check(
    code="pixelated",
    stage="crop",
    scope="photo",
    measures="share of the edge energy on one block grid (nearest-neighbour enlargement)",
    columns=(Column("pixelation", "float", "share of edge energy on one block grid"),),
    measure=_measure_pixelation,
    judge=_judge_pixelation,
    summary="look pixelated",
    settings=ImageSettings,
)


# JPEG blocks


def _measure_blockiness(sample: Sample) -> dict:
    return {"blockiness": round(blockiness(sample.centre), 4)}


def _judge_blockiness(photo: Photo, settings: ImageSettings) -> Finding:
    value = photo.measure["blockiness"]
    blocky = "pixelated" not in photo.flags and value >= settings.blockiness_threshold
    return Finding({"blockiness": value}, f"JPEG blocks visible (blockiness {value:.2f})" if blocky else None)


JPEG_BLOCKY = Check(
    code="jpeg_blocky",
    stage="crop",
    scope="photo",
    measures="edge strength on JPEG's 8-pixel grid over that inside the blocks",
    columns=(Column("blockiness", "float", "JPEG 8x8 grid edge strength over in-block edge strength"),),
    measure=_measure_blockiness,
    judge=_judge_blockiness,
    summary="show JPEG blocks",
    settings=ImageSettings,
)


# Upscaling


def _measure_upscale(sample: Sample) -> dict:
    strength, frequency = upscale_signature(sample.centre, include_nyquist=blockiness(sample.centre) < 1.15)
    return {
        "upscale": round(strength, 3),
        "upscale_frequency": round(frequency, 4),
        "detail": round(high_frequency_share(sample.centre), 5),
    }


def _upscaled(photo: Photo, settings: ImageSettings) -> bool:
    return (
        "pixelated" not in photo.flags
        and not photo.row["resized"]  # ingest's own downscale leaves a resampling trace of its own
        and photo.measure["upscale"] >= settings.upscale_threshold
        and photo.measure["detail"] < _UPSCALED_DETAIL  # a resampling trace with the top band empty: enlarged
    )


def _judge_upscale(photo: Photo, settings: ImageSettings) -> Finding:
    note = None
    if _upscaled(photo, settings):
        period = 1 / photo.measure["upscale_frequency"]
        note = f"looks upscaled: a resampling pattern repeats every {period:.1f} px (never upscale)"
    return Finding({"upscale": photo.measure["upscale"]}, note)


UPSCALED = Check(
    code="upscaled",
    stage="crop",
    scope="photo",
    measures="the periodic trace resampling leaves, with the top frequency band empty",
    columns=(Column("upscale", "float", "strength of the periodic pattern resampling leaves"),),
    measure=_measure_upscale,
    judge=_judge_upscale,
    summary="look upscaled",
    settings=ImageSettings,
)


# Blur


def _measure_sharpness(sample: Sample) -> dict:
    image, face = sample.image, sample.main
    if face is not None:
        left, top, right, bottom = face.box
        pad = 0.2 * face.width
        box = (
            max(0, int(left - pad)),
            max(0, int(top - pad)),
            min(image.width, int(right + pad)),
            min(image.height, int(bottom + pad)),
        )
        region = image.crop(box).resize((_FACE_SIDE, _FACE_SIDE), Image.Resampling.BICUBIC)
    else:
        scale = 512 / max(image.size)
        region = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return {"sharpness": round(sharpness(grey(region)), 4)}


def _set_medians(measures: list[dict], settings: ImageSettings) -> list[float | None]:
    """Each photo's reference: the median sharpness of its kind (a face's, or a whole image's) in the set."""
    medians = {}
    for on_face in (True, False):
        values = [m["sharpness"] for m in measures if ("box" in m) == on_face]
        medians[on_face] = float(np.median(values)) if len(values) >= MIN_RELATIVE else None
    return [medians["box" in m] for m in measures]


def _judge_sharpness(photo: Photo, settings: ImageSettings) -> Finding:
    value, median = photo.measure["sharpness"], photo.relation
    note = None
    if median and "pixelated" not in photo.flags:
        relative = value / median
        if relative < settings.blur_ratio and not _upscaled(photo, settings):
            note = f"blurred: {relative:.0%} of the set's median sharpness"
    return Finding({"sharpness": value}, note)


BLURRED = Check(
    code="blurred",
    stage="crop",
    scope="set",
    measures="variance of the Laplacian (on the face for a person), against the set's median",
    columns=(Column("sharpness", "float", "variance of the Laplacian (face region for a person), set-relative"),),
    measure=_measure_sharpness,
    relate=_set_medians,
    judge=_judge_sharpness,
    summary="look blurred",
    settings=ImageSettings,
)
