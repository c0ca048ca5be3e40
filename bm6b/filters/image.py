"""Image decoding, resizing, encoding and hashing with Pillow.

``process_image`` turns downloaded bytes into the stored JPEG and the image fields of the record,
or into a reject reason. It never raises on bad image data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import imagehash
from PIL import Image, ImageOps, UnidentifiedImageError

from bm6b.schemas.reasons import Reason


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    image_size: int = 256  # pixels; see resize_mode
    # "keep_ratio": the shorter side becomes image_size (never upscaled); "no": keep the size.
    resize_mode: str = "keep_ratio"
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit (about 0.25 GiB of RGBA)
    min_size: int = 0  # reject images whose shorter side is below this, in pixels
    max_aspect_ratio: float = 0.0  # reject longer/shorter above this; 0 disables


@dataclasses.dataclass
class ImageResult:
    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    sha256: str = ""
    phash: int = 0
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def compute_phash(image: Image.Image) -> int:
    """Return the 64-bit DCT pHash of an image as an unsigned int, first hash bit most significant."""
    return int(str(imagehash.phash(image)), 16)


def process_image(data: bytes, config: ImageConfig | None = None) -> ImageResult:
    cfg = config or ImageConfig()
    result = ImageResult(sha256=hashlib.sha256(data).hexdigest())
    if not data:
        result.reason, result.detail = Reason.EMPTY_BODY.value, "0 bytes"
        return result

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > cfg.max_pixels:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.load()
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
    except UnidentifiedImageError as err:
        result.reason, result.detail = Reason.NOT_AN_IMAGE.value, str(err)
        return result
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        result.reason, result.detail = Reason.DECOMPRESSION_BOMB.value, str(err)
        return result
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        result.reason, result.detail = Reason.DECODE_ERROR.value, f"{type(err).__name__}: {err}"
        return result

    result.orig_width, result.orig_height = image.size
    short, long = sorted(image.size)
    if short < cfg.min_size:
        result.reason, result.detail = Reason.TOO_SMALL.value, f"{image.width}x{image.height} < {cfg.min_size}"
        return result
    if cfg.max_aspect_ratio and long / short > cfg.max_aspect_ratio:
        result.reason, result.detail = Reason.BAD_ASPECT_RATIO.value, f"{long / short:.2f} > {cfg.max_aspect_ratio}"
        return result

    result.phash = compute_phash(image)
    image = resize(image, cfg)
    result.width, result.height = image.size
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    result.jpeg = buffer.getvalue()
    return result


def resize(image: Image.Image, cfg: ImageConfig) -> Image.Image:
    if cfg.resize_mode == "no":
        return image
    if cfg.resize_mode == "keep_ratio":
        short = min(image.size)
        if short <= cfg.image_size:
            return image
        scale = cfg.image_size / short
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)
    raise ValueError(f"unknown resize_mode {cfg.resize_mode!r}; expected 'keep_ratio' or 'no'")
