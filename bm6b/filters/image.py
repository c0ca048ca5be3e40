"""Image decoding, colour normalization, resizing, encoding and hashing with Pillow.

``process_image`` turns downloaded bytes into the stored image and the image fields of the
record, or into a reject reason. It never raises on bad image data. The decode steps, in order:

1. sniff the magic bytes and open with only the formats in ``DECODABLE_FORMATS``;
2. reject more pixels than ``max_pixels`` before decoding (decompression bombs);
3. decode the first frame only (animated GIF, WebP and APNG), truncated data is a decode_error,
   and so is a PNG whose pixel data ends before its last scanline;
4. scale 16-bit and 32-bit samples to 8 bits by their range (never clip);
5. convert through the embedded ICC profile to sRGB (CMYK, wide-gamut RGB, grey);
6. composite palette transparency and alpha on ``background``;
7. apply the EXIF orientation (all eight values);
8. resize (modes as in img2dataset) and encode to JPEG or WebP.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import struct
import zlib

import imagehash
import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from bm6b.filters.sniff import DECODABLE_FORMATS, describe_non_image, sniff_image_format
from bm6b.schemas.reasons import Reason

logger = logging.getLogger(__name__)

RESIZE_MODES = ("no", "border", "center_crop", "keep_ratio", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "webp")
# Pillow resampling filters by img2dataset's interpolation names. "area" is Pillow's BOX filter,
# which averages the source pixels each output pixel covers, as OpenCV's INTER_AREA does when shrinking.
INTERPOLATIONS = {
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Register every plugin now: Image.open(formats=...) raises KeyError for one that is not loaded yet.
Image.init()
_SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    image_size: int = 256  # pixels; see resize_mode
    # no: keep the size; keep_ratio: the shorter side becomes image_size; keep_ratio_largest: the
    # longer side does; center_crop: shorter side to image_size, then the centre square; border:
    # longer side to image_size, then padded with background to a square.
    resize_mode: str = "keep_ratio"
    # keep_ratio and keep_ratio_largest only shrink unless this is False; center_crop and border
    # always produce image_size x image_size.
    resize_only_if_bigger: bool = True
    # Filters when the output is larger (upscale) or smaller (downscale) than the source, named as in
    # INTERPOLATIONS. The defaults are img2dataset's: lanczos up, area down. Area costs about a third
    # of lanczos (Pillow 12.3, measured) when shrinking a 375x375 crop to 256x256.
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: str = "jpg"  # jpg or webp
    jpeg_quality: int = 95
    webp_quality: int = 90
    background: tuple[int, int, int] = (255, 255, 255)  # RGB behind transparent pixels and borders
    max_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit (about 0.25 GiB of RGBA)
    min_size: int = 0  # reject images whose shorter side is below this, in pixels
    max_aspect_ratio: float = 0.0  # reject longer/shorter above this; 0 disables

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"unknown encode_format {self.encode_format!r}; expected jpg or webp")
        for name in (self.upscale_interpolation, self.downscale_interpolation):
            if name not in INTERPOLATIONS:
                raise ValueError(f"unknown interpolation {name!r}; expected one of {', '.join(INTERPOLATIONS)}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")


@dataclasses.dataclass
class ImageResult:
    jpeg: bytes | None = None  # the encoded output image (JPEG or WebP, see encode_format)
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    sha256: str = ""
    phash: int = 0
    reason: str | None = None
    detail: str = ""
    source_format: str | None = None  # Pillow format of the input, e.g. JPEG, PNG
    encode_format: str = "jpg"

    @property
    def ok(self) -> bool:
        return self.reason is None


class ImageReject(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason.value
        self.detail = detail


# pHash as imagehash 4.3.2 defines it: greyscale, 32x32 LANCZOS, 2-D DCT-II (scipy.fftpack.dct, no
# normalization), the top-left 8x8 coefficients, each bit set when the coefficient is above their
# median. Only the first 8 DCT rows are needed, so two small matrix products replace imagehash's
# two full 32-point transforms: low = D @ pixels @ D.T with D[k, n] = 2 cos(pi k (2n + 1) / 64).
_PHASH_BITS_SIDE = 8
_PHASH_INPUT_SIDE = 32
_PHASH_DCT = 2.0 * np.cos(
    np.pi
    * np.arange(_PHASH_BITS_SIDE)[:, None]
    * (2 * np.arange(_PHASH_INPUT_SIDE)[None, :] + 1)
    / (2 * _PHASH_INPUT_SIDE)
)
# The matrix product and scipy's FFT-based DCT round differently, by far less than 1e-6 for 8-bit
# pixels (coefficients are at most about 1e6). A coefficient this close to the median could land
# on the other side of it, so such images (flat ones, where many coefficients are 0) go through
# imagehash itself.
_PHASH_TIE_MARGIN = 1e-6


def compute_phash(image: Image.Image) -> int:
    """Return the 64-bit DCT pHash of an image as an unsigned int, first hash bit most significant.

    The value equals ``int(str(imagehash.phash(image)), 16)``, because near-ties, where the two DCT
    computations could disagree, are handed to imagehash itself.
    """
    grey = image.convert("L").resize((_PHASH_INPUT_SIDE, _PHASH_INPUT_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = _PHASH_DCT @ pixels @ _PHASH_DCT.T
    ordered = np.sort(low, axis=None)
    middle = ordered.size // 2
    median = (ordered[middle - 1] + ordered[middle]) / 2
    if np.abs(low - median).min() < _PHASH_TIE_MARGIN:
        return int(str(imagehash.phash(image)), 16)
    return int.from_bytes(np.packbits(low > median).tobytes(), "big")


# ---------------------------------------------------------------- decode


def read_orientation(image: Image.Image) -> int:
    """Return the EXIF orientation (1-8), or 1 when the tag is missing, invalid or the EXIF is corrupt."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed EXIF; the image may still be fine
        return 1
    if isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _draft_size(width: int, height: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """Return the smallest size the JPEG decoder may scale to without losing output resolution."""
    if cfg.resize_mode == "no":
        return None
    side = min(width, height) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    scale = cfg.image_size / side
    if scale >= 1:
        return None
    return math.ceil(width * scale), math.ceil(height * scale)


def _allow_pillow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own pixel limit to ``max_pixels`` when it is lower.

    Image.open raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS (and warns above
    it), which would cap a larger max_pixels. The limit is a module global, so it is only ever
    raised here, never lowered, and the check after Image.open enforces max_pixels.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# Samples per pixel for each PNG colour type: grey, RGB, palette index, grey and alpha, RGBA.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# The seven Adam7 passes of an interlaced PNG: (first column, first row, column step, row step).
_ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_COUNT_CHUNK = 1 << 20  # bytes of decompressed pixel data counted per zlib call


def _png_filtered_size(width: int, height: int, bit_depth: int, color_type: int, interlaced: bool) -> int:
    """Return the bytes of filtered scanlines (one filter byte per row) that an IHDR requires."""
    bits_per_pixel = _PNG_CHANNELS[color_type] * bit_depth
    passes = _ADAM7_PASSES if interlaced else ((0, 0, 1, 1),)
    size = 0
    for first_column, first_row, column_step, row_step in passes:
        columns = max(0, -(-(width - first_column) // column_step))
        rows = max(0, -(-(height - first_row) // row_step))
        if columns and rows:
            # An empty pass has no scanlines at all, so it has no filter bytes either.
            size += rows * (1 + -(-(columns * bits_per_pixel) // 8))
    return size


def check_png_pixel_data(image: Image.Image, data: bytes) -> None:
    """Raise ImageReject when a loaded PNG's pixel data is shorter than its IHDR requires.

    Pillow 12.3 ends decoding without an error when the zlib stream ends cleanly before the last
    scanline, and it leaves the missing rows zero (black or transparent). Call this only after
    ``image.load()``, which validates the signature, the IHDR and the zlib stream. The chunks are
    read again here and the decompressed bytes only counted, so memory stays bounded. The count
    adds about a quarter to ``process_image`` on a 1024x768 RGB PNG (10 of 40 ms, measured), so
    it is skipped when the last row of a non-interlaced image has a nonzero byte. Pillow's PNG
    decoder writes a row only once all its bytes are decompressed, so that row was in the data.
    """
    view = memoryview(data)
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", view[16:29])
    if color_type not in _PNG_CHANNELS:
        return
    if interlace == 0:
        last_row = image.crop((0, image.height - 1, image.width, image.height)).tobytes()
        if last_row.count(0) < len(last_row):
            return
    expected = _png_filtered_size(width, height, bit_depth, color_type, interlace == 1)

    decompressor = zlib.decompressobj()
    produced = 0
    position = 8
    try:
        while position + 8 <= len(view) and produced < expected and not decompressor.eof:
            length, kind = struct.unpack(">I4s", view[position : position + 8])
            payload = view[position + 8 : position + 8 + length]
            position += 12 + length
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                continue
            pending = payload
            while pending and produced < expected and not decompressor.eof:
                produced += len(decompressor.decompress(pending, _PNG_COUNT_CHUNK))
                pending = decompressor.unconsumed_tail
        if produced < expected and not decompressor.eof:
            produced += len(decompressor.flush())
    except zlib.error as err:
        raise ImageReject(Reason.DECODE_ERROR, f"PNG pixel data is invalid: {err}") from err
    if produced < expected:
        raise ImageReject(Reason.DECODE_ERROR, f"PNG pixel data ends after {produced} of {expected} bytes")


def decode_image(data: bytes, cfg: ImageConfig) -> tuple[Image.Image, tuple[int, int], str]:
    """Decode the first frame to upright 8-bit sRGB; return (image, original upright size, format).

    Raises ImageReject with the reason code for anything that is not a usable image.
    """
    if not data:
        raise ImageReject(Reason.EMPTY_BODY, "0 bytes")
    if sniff_image_format(data[:32]) is None:
        raise ImageReject(Reason.NOT_AN_IMAGE, f"data is {describe_non_image(data[:512])}")
    _allow_pillow_pixels(cfg.max_pixels)

    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageReject(Reason.DECODE_ERROR, f"{width}x{height} image")
        if width * height > cfg.max_pixels:
            raise ImageReject(Reason.DECOMPRESSION_BOMB, f"{width}x{height} pixels > max_pixels {cfg.max_pixels}")

        source_format = image.format or "unknown"
        if source_format in ("JPEG", "MPO"):  # the JPEG plugin returns MPO for multi-picture files
            draft = _draft_size(width, height, cfg)
            if draft is not None:
                # DCT scaling in the decoder: 2-8x less work for images much larger than the output.
                image.draft(None, draft)
        sixteen_bit_rgb = image.mode == "RGB" and any(";16" in str(tile.args) for tile in image.tile)
        # Load before reading EXIF: PNG's getexif() loads the pixels itself, and read_orientation
        # swallows errors, which would hide a corrupt data stream.
        image.load()
        if sixteen_bit_rgb and isinstance(image.info.get("transparency"), tuple):
            # Pillow 12.3 keeps the high byte of each 16-bit sample but the tRNS colour in 16 bits,
            # so compare high bytes. NOTE: colours that differ from the key only in their low bytes
            # become transparent too, because the low bytes are gone.
            image.info["transparency"] = tuple(value >> 8 for value in image.info["transparency"])
        if source_format == "PNG":
            check_png_pixel_data(image, data)
        orientation = read_orientation(image)
        image = to_rgb(image, cfg.background)
    except ImageReject:
        raise
    except UnidentifiedImageError as err:
        # The magic bytes matched a supported format, so this is a corrupt file of that format.
        raise ImageReject(Reason.DECODE_ERROR, f"{sniff_image_format(data[:32])} signature but unreadable header") from err
    except Image.DecompressionBombError as err:
        raise ImageReject(Reason.DECOMPRESSION_BOMB, str(err)) from err
    except ValueError as err:
        if "too large" in str(err) or "Too much memory" in str(err):
            # PNG text-chunk bombs: Pillow stops inflating zTXt/iTXt past MAX_TEXT_CHUNK / MAX_TEXT_MEMORY.
            raise ImageReject(Reason.DECOMPRESSION_BOMB, str(err)) from err
        raise ImageReject(Reason.DECODE_ERROR, f"ValueError: {err}") from err
    except Exception as err:  # noqa: BLE001 - corrupt data makes Pillow plugins raise many types
        raise ImageReject(Reason.DECODE_ERROR, f"{type(err).__name__}: {err}") from err

    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
        if orientation >= 5:
            width, height = height, width
    return image, (width, height), source_format


# ---------------------------------------------------------------- colour


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer and float greyscale to "L" by the sample range, never clipping."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float32) / 257.0
    elif image.mode == "I":
        top = int(array.max()) if array.size else 0
        # Pillow decodes 16-bit PNG and TIFF greyscale to "I" too; values above 65535 mean a 32-bit range.
        scaled = array.astype(np.float64) / (257.0 if top <= 65535 else top / 255.0)
    else:  # "F"
        finite = array[np.isfinite(array)]
        top = float(finite.max()) if finite.size else 1.0
        scaled = np.nan_to_num(array, nan=0.0) * (255.0 if top <= 1.0 else 255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


@functools.lru_cache(maxsize=64)
def _icc_transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Build (once per profile and mode) the transform to sRGB; None when the profile is sRGB already."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    description = (ImageCms.getProfileDescription(source) or "").strip()
    if description.startswith("sRGB") and mode in ("RGB", "RGBA"):
        return None
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(source, _SRGB_PROFILE, mode, out_mode, renderingIntent=ImageCms.Intent.PERCEPTUAL)


def _apply_icc(image: Image.Image, profile: bytes | None) -> Image.Image:
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return image
    try:
        transform = _icc_transform(profile, image.mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as err:
        # A broken or unsupported profile: browsers ignore it and show the raw values, so do we.
        logger.debug("ignoring unusable ICC profile (%d bytes): %s", len(profile), err)
        return image
    if transform is None:
        return image
    try:
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, ValueError) as err:
        logger.debug("ICC transform failed, using the raw values: %s", err)
        return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any decoded mode to 8-bit sRGB "RGB", compositing transparency on ``background``."""
    profile = image.info.get("icc_profile")
    has_transparency = "transparency" in image.info

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        key = image.info.get("transparency") if has_transparency else None
        transparent = np.asarray(image) == key if isinstance(key, int) else None
        image = _scale_to_8bit(image)
        if transparent is not None:
            # The tRNS grey level is in the source's 16-bit units, so the mask is taken before scaling.
            image.putalpha(Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8), "L"))
    elif image.mode == "LAB":
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), _SRGB_PROFILE, "LAB", "RGB")
        return ImageCms.applyTransform(image, lab_to_srgb)

    if image.mode in ("P", "PA", "1", "LA", "La", "RGBa") or (has_transparency and image.mode in ("L", "RGB")):
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        image = image.convert("RGB")

    image = _apply_icc(image, profile)

    if image.mode == "RGBA":
        extrema = image.getchannel("A").getextrema()
        if extrema[0] < 255:
            base = Image.new("RGBA", image.size, (*background, 255))
            image = Image.alpha_composite(base, image)
    return image.convert("RGB") if image.mode != "RGB" else image


# ---------------------------------------------------------------- resize and encode


def _resample_filter(source_side: int, target_side: int, cfg: ImageConfig) -> Image.Resampling:
    name = cfg.upscale_interpolation if target_side > source_side else cfg.downscale_interpolation
    return INTERPOLATIONS[name]


def resize(image: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Resize per ``cfg.resize_mode``; see ImageConfig for what each mode produces."""
    size = cfg.image_size
    width, height = image.size
    mode = cfg.resize_mode

    if mode == "no":
        return image

    if mode in ("keep_ratio", "keep_ratio_largest"):
        side = min(width, height) if mode == "keep_ratio" else max(width, height)
        if side == size or (side < size and cfg.resize_only_if_bigger):
            return image
        scale = size / side
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        return image.resize(target, _resample_filter(side, size, cfg), reducing_gap=3.0)

    if mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        if side == size and width == height:
            return image
        # One resampling pass straight from the centre square of the source.
        resample = _resample_filter(side, size, cfg)
        return image.resize((size, size), resample, box=(left, top, left + side, top + side), reducing_gap=3.0)

    # border
    side = max(width, height)
    scale = size / side
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = _resample_filter(side, size, cfg)
    inner = image if target == image.size else image.resize(target, resample, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), cfg.background)
    canvas.paste(inner, ((size - target[0]) // 2, (size - target[1]) // 2))
    return canvas


def encode(image: Image.Image, cfg: ImageConfig) -> bytes:
    buffer = io.BytesIO()
    if cfg.encode_format == "webp":
        image.save(buffer, format="WEBP", quality=cfg.webp_quality)
    else:
        image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    return buffer.getvalue()


def process_image(data: bytes, config: ImageConfig | None = None) -> ImageResult:
    """Decode, check, hash, resize and encode one downloaded image; never raises on bad data."""
    cfg = config or ImageConfig()
    result = ImageResult(sha256=hashlib.sha256(data).hexdigest(), encode_format=cfg.encode_format)
    try:
        image, (orig_width, orig_height), result.source_format = decode_image(data, cfg)
    except ImageReject as reject:
        result.reason, result.detail = reject.reason, reject.detail
        return result

    result.orig_width, result.orig_height = orig_width, orig_height
    short, long = sorted((orig_width, orig_height))
    if short < cfg.min_size:
        result.reason, result.detail = Reason.TOO_SMALL.value, f"{orig_width}x{orig_height} < {cfg.min_size}"
        return result
    if cfg.max_aspect_ratio and long / short > cfg.max_aspect_ratio:
        result.reason, result.detail = Reason.BAD_ASPECT_RATIO.value, f"{long / short:.2f} > {cfg.max_aspect_ratio}"
        return result

    result.phash = compute_phash(image)
    image = resize(image, cfg)
    try:
        encoded = encode(image, cfg)
    except (OSError, ValueError) as err:
        # Pillow 12.3 raises these for sizes past the format's limit: 65,500 px a side for JPEG,
        # 16,383 for WebP. Sizes come from the source when resizing is off or only shrinks.
        result.reason = Reason.ENCODE_ERROR.value
        result.detail = f"{image.width}x{image.height} {cfg.encode_format}: {type(err).__name__}: {err}"
        return result
    result.width, result.height = image.size
    result.jpeg = encoded
    return result
