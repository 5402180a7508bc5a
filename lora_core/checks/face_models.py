"""Faces, offline: dlib's detector, 5-point landmarks and 128-d identity descriptor.

Why these models (docs/dataset-checks.md has the longer version):

- they install from PyPI with their weights (`dlib-bin` has the HOG detector
  built in; `face_recognition_models` carries the landmark and descriptor
  files), so nothing is downloaded at run time;
- dlib's author released the model files into the public domain; the
  5-point landmark model was trained on his own annotations and the ResNet
  descriptor on Creative Commons face datasets. We never load the 68-point
  model, whose iBUG 300-W training data restricts commercial use;
- the descriptor is a tested identity embedding (99.38% on LFW), cheap on a
  CPU (about 0.1 s a face), and the same one checkpoint selection uses.

The HOG detector finds upright, roughly frontal faces only. That weakness is
what finds a photo's rotation: the face is found only when the photo is upright.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from lora_core.foundation.errors import UserError

__all__ = ["Face", "FaceModelError", "FaceModels", "face_models"]

_LANDMARKS = "shape_predictor_5_face_landmarks.dat"
_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150  # the descriptor's input size
DETECTION_THRESHOLD = 0.0  # dlib's own; real faces in our test photos score 0.9 and more


class FaceModelError(UserError, RuntimeError):
    """The face models are not installed."""


@dataclass(frozen=True)
class Face:
    """One detected face, in the coordinates of the image it was found in."""

    box: tuple[int, int, int, int]  # left, top, right, bottom; may reach past the border
    score: float  # detector confidence, over DETECTION_THRESHOLD
    landmarks: tuple[tuple[float, float], ...]  # 5 points: two corners of each eye, the nose base

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    def cut_sides(self, size: tuple[int, int], margin: float = 0.0) -> list[str]:
        """The image borders that cut through the face box (`margin` as a fraction of its width)."""
        width, height = size
        pad = margin * self.width
        left, top, right, bottom = self.box
        sides = []
        if left < -pad:
            sides.append("left")
        if top < -pad:
            sides.append("top")
        if right > width + pad:
            sides.append("right")
        if bottom > height + pad:
            sides.append("bottom")
        return sides


def _model_folder() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources,
    # which new setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(
            "the face models are not installed: pip install dlib-bin face_recognition_models "
            "(or set subject_type to object or style to skip the face checks)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceModels:
    """The three dlib models, loaded once per process."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as err:
            raise FaceModelError(f"dlib is not installed ({err}): pip install dlib-bin") from None
        folder = _model_folder()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(folder / _LANDMARKS))
        self._descriptor = dlib.face_recognition_model_v1(str(folder / _DESCRIPTOR))
        self.identity = f"dlib-{dlib.__version__}:hog+{_LANDMARKS}+{_DESCRIPTOR}"

    def __reduce__(self) -> tuple:
        """Pickled as "the process's own models": a worker process loads them once, not the bytes of dlib's."""
        return (face_models, ())

    def detect(self, rgb: np.ndarray, max_side: int = 800) -> list[Face]:
        """Faces in an RGB uint8 array, best first.

        Detection runs on a copy at most `max_side` pixels long (fast), and
        again at twice that size when nothing is found (HOG misses faces under
        about 80 px); landmarks are placed on the full image.
        """
        height, width = rgb.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        small = rgb if scale == 1.0 else _resize(rgb, scale)
        rects, scores, _ = self._detector.run(small, 0, DETECTION_THRESHOLD)
        if not rects:
            rects, scores, _ = self._detector.run(small, 1, DETECTION_THRESHOLD)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = tuple(round(v / scale) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
            shape = self._landmarks(rgb, self._dlib.rectangle(*box))
            points = tuple((float(shape.part(i).x), float(shape.part(i).y)) for i in range(shape.num_parts))
            faces.append(Face(box, float(score), points))  # type: ignore[arg-type]
        return sorted(faces, key=lambda f: -f.score)

    def chip(self, rgb: np.ndarray, face: Face, size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
        """The face aligned by its landmarks (eyes level, fixed scale), as the descriptor expects."""
        points = [self._dlib.point(round(x), round(y)) for x, y in face.landmarks]
        shape = self._dlib.full_object_detection(self._dlib.rectangle(*face.box), points)
        return np.asarray(self._dlib.get_face_chip(rgb, shape, size=size, padding=padding))

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        """The 128-d identity descriptor of an aligned chip; distance < 0.6 means the same person."""
        return np.asarray(self._descriptor.compute_face_descriptor(np.ascontiguousarray(chip)), dtype=np.float32)


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(rgb)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


@cache
def face_models() -> FaceModels:
    """The process's face models (loading takes about half a second)."""
    return FaceModels()
