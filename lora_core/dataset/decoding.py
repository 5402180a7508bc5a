"""One photo's bytes decoded for training: checked before decoding, then 8-bit sRGB, upright, not too large.

The header is read first, so a decompression bomb or a too-small image is
refused before any pixel is decoded; every refusal is a `RejectedImage` whose
message is the reason shown to the user. Colours survive the conversion
(transparency on white, 16-bit greys scaled, ICC profiles to sRGB).

Phones' own formats open too: HEIC/HEIF (every iPhone's default) through
pillow-heif's libheif, AVIF through Pillow's own plugin (Pillow >= 11.3 wheels
ship libavif). The two turn photos upright differently: libheif applies the
file's rotation (`irot`/`imir`) while decoding and pillow-heif resets the EXIF
orientation to 1, keeping the original in `info["original_orientation"]`, so a
HEIC is never turned twice; Pillow's AVIF plugin leaves the pixels as stored and
reports the rotation as EXIF orientation, which we apply as for a JPEG.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from lora_core.config.settings import IngestSettings
from lora_core.foundation.errors import UserError

__all__ = ["DecodedImage", "RejectedImage", "decode_image", "to_rgb8"]

_EXIF_ORIENTATION = 0x0112
_UPRIGHT_ORIENTATIONS = range(2, 9)  # EXIF orientations that turn or mirror the stored pixels

# The primary image only: a phone's HEIC also carries thumbnails, depth maps and HDR gain maps.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


class RejectedImage(UserError):
    """An input file that is not a usable photo; the message is the reason."""


@dataclass
class DecodedImage:
    """A photo decoded to 8-bit RGB, upright, at most the long-side limit."""

    image: Image.Image
    source_size: tuple[int, int]
    source_format: str
    source_mode: str
    exif_rotated: bool
    resized: bool


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency is flattened onto white, 16/32-bit and float greys are scaled
    (not clipped) to 8 bits, and an embedded ICC profile (CMYK, Adobe RGB,
    Display P3) is converted to sRGB so colours survive.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if mode.startswith("I;16") or top > 255:
            scale = 65535.0
        elif mode == "F" and top <= 1.0:
            scale = 1.0
        else:
            scale = 255.0
        grey = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    icc = image.info.get("icc_profile")
    if icc and mode in ("RGB", "CMYK"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to Pillow's plain conversion
    return image.convert("RGB")


def decode_image(data: bytes, settings: IngestSettings) -> DecodedImage:
    """Decode one photo or raise `RejectedImage` with the reason.

    The size in the header is checked before any pixel is decoded, so a
    decompression bomb costs nothing and a too-small image is refused cheaply.
    """
    with warnings.catch_warnings():
        # Our own limit (settings.max_pixels) decides; Pillow's warning is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise RejectedImage(_unrecognised(data)) from None
        except Image.DecompressionBombError:
            raise RejectedImage("decompression bomb: header declares too many pixels; not decoded") from None
        except Exception as err:  # Pillow raises many types for a broken header
            raise RejectedImage(f"corrupt image header: {err}") from None
        width, height = image.size
        if width * height > settings.max_pixels:
            raise RejectedImage(
                f"decompression bomb guard: header declares {width}x{height} "
                f"({width * height / 1e6:.0f} MP), over the {settings.max_pixels / 1e6:.0f} MP limit; not decoded"
            )
        if min(width, height) < settings.min_short_side:
            raise RejectedImage(
                f"too small: {width}x{height}, short side under {settings.min_short_side} px (never upscaled)"
            )
        try:
            image.load()
        except Exception as err:
            raise RejectedImage(f"truncated or corrupt image data: {err}") from None

    source_format, source_mode = image.format or "", image.mode
    # A HEIF was turned upright by libheif while it decoded; its EXIF now says 1.
    turned_on_decode = image.info.get("original_orientation") in _UPRIGHT_ORIENTATIONS
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    exif_rotated = orientation in _UPRIGHT_ORIENTATIONS
    if exif_rotated:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:
            exif_rotated = False  # malformed EXIF: keep the pixels as stored
    exif_rotated = exif_rotated or turned_on_decode
    try:
        rgb = to_rgb8(image)
    except Exception as err:
        raise RejectedImage(f"unsupported image mode {source_mode}: {err}") from None

    resized = max(rgb.size) > settings.max_long_side
    if resized:
        scale = settings.max_long_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return DecodedImage(rgb, (width, height), source_format, source_mode, exif_rotated, resized)


def _unrecognised(data: bytes) -> str:
    """Why Pillow did not recognise `data`: not an image, or an AVIF this Pillow cannot read."""
    if data[4:8] == b"ftyp" and b"avif" in data[8:32] and not features.check("avif"):
        return "AVIF photo, but this Pillow has no AVIF support (install Pillow >= 11.3)"
    return "not an image (format not recognised)"
