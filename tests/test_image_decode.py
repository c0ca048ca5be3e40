"""Decode torture tests: every file of Pillow's dirty-image set, plus generated hard cases.

Each real file either decodes upright with the right colours, checked against pixels computed
independently (the lossless upright hopper.png, the RGB twin of the CMYK file, alpha compositing
done in numpy), or is rejected with the expected reason code.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageCms

from bm6b.filters.image import ImageConfig, compute_phash, decode_image, process_image, resize
from tests.download_servers import NGINX_404, SVG

DIRTY = "dirty-images-pillow"
NO_RESIZE = ImageConfig(resize_mode="no")

# Expected outcome of process_image with default settings for each file: None means decoded.
EXPECTED = {
    "1_trns.png": None,
    "anchor_horizontal.svg": "not_an_image",
    "apng_mode_16bit.png": None,
    "app13-multiple.jpg": None,
    "bmp_reallybig.bmp": "decompression_bomb",
    "broken.png": "decode_error",
    "broken_data_stream.png": "decode_error",
    "chi.gif": None,
    "decompression_bomb.gif": "decompression_bomb",
    "dispose_bgnd_transparency.gif": None,
    "empty_gps_ifd.jpg": None,
    "flower.jpg": None,
    "flower2.jpg": None,
    "hopper.bmp": None,
    "hopper.gif": None,
    "hopper.jpg": None,
    "hopper.png": None,
    "hopper.webp": None,
    "hopper_bad_exif.jpg": None,
    "hopper_gray.jpg": None,
    "hopper_orientation_2.jpg": None,
    "hopper_orientation_3.jpg": None,
    "hopper_orientation_4.jpg": None,
    "hopper_orientation_5.jpg": None,
    "hopper_orientation_6.jpg": None,
    "hopper_orientation_7.jpg": None,
    "hopper_orientation_8.jpg": None,
    "icc_profile_big.jpg": None,
    "invalid-exif.jpg": None,
    "iss634.gif": None,
    "iss634.webp": None,
    "junk_jpeg_header.jpg": None,
    "l_trns.png": None,
    "old-style-jpeg-compression.png": None,
    "orientation_rectangle.jpg": None,
    "p_trns_single.png": None,
    "pil123p.png": None,
    "pil_sample_cmyk.jpg": None,
    "pil_sample_rgb.jpg": None,
    "png_decompression_dos.png": "decompression_bomb",
    "rgb_trns.png": None,
    "test-ole-file.doc": "not_an_image",
    "tiny.png": None,
    "transparent.gif": None,
    "transparent.png": None,
    "truncated_end_chunk.png": "decode_error",
    "truncated_image.png": "decode_error",
    "truncated_jpeg.jpg": "decode_error",
}


@pytest.fixture(scope="module")
def dirty(shared_raw):
    folder = shared_raw / DIRTY
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


def read(dirty, name: str) -> bytes:
    return (dirty / name).read_bytes()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


# ---------------------------------------------------------------- every file of the set


def test_torture_set_fully_covered(dirty):
    names = {p.name for p in dirty.iterdir() if p.name not in ("manifest.tsv", "SOURCE.md")}

    assert names == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torture_file_outcome(dirty, name):
    data = read(dirty, name)

    result = process_image(data)

    assert result.reason == EXPECTED[name], result.detail
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    if result.ok:
        decoded = Image.open(io.BytesIO(result.jpeg))
        assert decoded.format == "JPEG"
        assert decoded.mode == "RGB"
        assert decoded.size == (result.width, result.height)
        assert result.orig_width > 0
        assert result.orig_height > 0
    else:
        assert result.jpeg is None
        assert result.detail


# Decoded files whose pixels differ from a plain upright RGB conversion on purpose. Each kind has
# its own test below: alpha or a colour key on the background, sRGB conversion, 16-bit scaling,
# CMYK, and the first frame of an animation.
SPECIAL_PIXELS = {
    "1_trns.png", "apng_mode_16bit.png", "chi.gif", "dispose_bgnd_transparency.gif", "icc_profile_big.jpg",
    "iss634.gif", "iss634.webp", "l_trns.png", "p_trns_single.png", "pil123p.png", "pil_sample_cmyk.jpg",
    "rgb_trns.png", "tiny.png", "transparent.gif", "transparent.png",
}


@pytest.mark.parametrize("name", sorted(n for n, reason in EXPECTED.items() if reason is None and n not in SPECIAL_PIXELS))
def test_torture_file_pixels(dirty, name):
    """The other decodable files match Pillow's own upright RGB conversion of the whole image."""
    from PIL import ImageOps

    with Image.open(dirty / name) as reference:
        reference = ImageOps.exif_transpose(reference).convert("RGB")
    image, _, _ = decode_image(read(dirty, name), NO_RESIZE)

    assert image.size == reference.size
    assert np.abs(pixels(image) - pixels(reference)).max() <= 1


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_matches_upright(dirty, orientation):
    upright = pixels(Image.open(dirty / "hopper.png"))
    image, size, _ = decode_image(read(dirty, f"hopper_orientation_{orientation}.jpg"), NO_RESIZE)
    decoded = pixels(image)

    error = np.abs(decoded - upright).mean()
    wrong = [
        np.abs(pixels(Image.fromarray(upright.astype(np.uint8)).transpose(t)) - decoded).mean()
        for t in Image.Transpose  # the seven non-identity flips and rotations
    ]

    assert size == (128, 128)
    assert error < 8.0  # JPEG noise only; a wrong orientation differs by about 60 on this photo
    assert error < min(wrong) / 5


def test_orientation_swaps_original_size(dirty):
    result = process_image(read(dirty, "orientation_rectangle.jpg"), NO_RESIZE)

    assert (result.orig_width, result.orig_height) == (1, 2)
    assert (result.width, result.height) == (1, 2)


def test_orientation_6_turns_generated_image():
    # A 4x2 image whose left half is red, saved with orientation 6 (rotate 90 clockwise to view).
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", quality=95, exif=exif)

    image, size, _ = decode_image(buffer.getvalue(), NO_RESIZE)
    top, bottom = pixels(image)[5, 10], pixels(image)[35, 10]

    assert size == (20, 40)
    assert top[0] > 200  # the red left half is now on top
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


# ---------------------------------------------------------------- colour


def test_cmyk_matches_rgb_twin(dirty):
    cmyk, _, _ = decode_image(read(dirty, "pil_sample_cmyk.jpg"), NO_RESIZE)
    rgb, _, _ = decode_image(read(dirty, "pil_sample_rgb.jpg"), NO_RESIZE)

    assert np.abs(pixels(cmyk) - pixels(rgb)).mean() < 8.0


def test_icc_profile_converted_to_srgb(dirty):
    data = read(dirty, "icc_profile_big.jpg")
    raw = Image.open(io.BytesIO(data))
    raw.load()
    profile = ImageCms.ImageCmsProfile(io.BytesIO(raw.info["icc_profile"]))
    expected = ImageCms.profileToProfile(raw, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")

    image, _, _ = decode_image(data, NO_RESIZE)

    assert np.abs(pixels(image) - pixels(expected)).max() <= 1
    assert np.abs(pixels(image) - pixels(raw)).mean() > 1.0  # the profile is not sRGB, so values move


def composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb * a + np.asarray(background, dtype=np.float64) * (1 - a)).astype(np.int16)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_rgba_composited_on_background(dirty, background):
    raw = np.asarray(Image.open(dirty / "transparent.png"))  # RGBA
    expected = composite(raw[..., :3].astype(np.float64), raw[..., 3], background)

    image, _, _ = decode_image(read(dirty, "transparent.png"), ImageConfig(resize_mode="no", background=background))

    assert (raw[..., 3] < 255).any()
    assert np.abs(pixels(image) - expected).max() <= 1


@pytest.mark.parametrize("name", ["p_trns_single.png", "transparent.gif", "pil123p.png", "tiny.png"])
def test_palette_transparency_uses_background(dirty, name):
    raw = Image.open(dirty / name)
    indices = np.asarray(raw)
    palette = np.asarray(raw.getpalette() + [0] * 768)[:768].reshape(256, 3)
    # tRNS is one transparent index, or an alpha byte per palette entry (255 past its end).
    transparency = raw.info["transparency"]
    alpha_table = np.full(256, 255)
    if isinstance(transparency, bytes):
        alpha_table[: len(transparency)] = list(transparency)
    else:
        alpha_table[transparency] = 0
    expected = composite(palette[indices].astype(np.float64), alpha_table[indices], (0, 0, 255))

    image, _, _ = decode_image(read(dirty, name), ImageConfig(resize_mode="no", background=(0, 0, 255)))

    assert (alpha_table[indices] < 255).any()
    assert np.abs(pixels(image) - expected).max() <= 1


def test_rgb_color_key_transparency(dirty):
    raw = Image.open(dirty / "rgb_trns.png")
    rgb = np.asarray(raw).astype(np.int16)
    key = np.asarray(raw.info["transparency"])
    expected = rgb.copy()
    expected[(rgb == key).all(axis=-1)] = (1, 2, 3)

    image, _, _ = decode_image(read(dirty, "rgb_trns.png"), ImageConfig(resize_mode="no", background=(1, 2, 3)))

    assert (rgb == key).all(axis=-1).any()
    assert np.array_equal(pixels(image), expected)


def test_grey_with_transparency(dirty):
    raw = Image.open(dirty / "l_trns.png")
    grey = np.asarray(raw).astype(np.int16)
    expected = np.repeat(grey[..., None], 3, axis=-1)
    expected[grey == raw.info["transparency"]] = (9, 9, 9)

    image, _, _ = decode_image(read(dirty, "l_trns.png"), ImageConfig(resize_mode="no", background=(9, 9, 9)))

    assert np.array_equal(pixels(image), expected)


def png_bytes(array: np.ndarray, color_type: int, key: tuple[int, ...] | None = None) -> bytes:
    """Encode a 16-bit PNG by hand (grey: type 0, RGB: type 2), independent of Pillow's encoder.

    ``key`` adds a tRNS chunk: the 16-bit sample values of the one transparent grey level or colour.
    """
    height, width = array.shape[:2]
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    transparency = chunk(b"tRNS", struct.pack(f">{len(key)}H", *key)) if key else b""
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + transparency + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_grey_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)

    image, _, _ = decode_image(png_bytes(values, 0), NO_RESIZE)
    decoded = pixels(image)[..., 0]
    expected = np.rint(values / 257.0)

    assert np.abs(decoded - expected).max() <= 1
    assert (decoded == 255).mean() < 0.01  # clipping at 255 would make 99 % of this gradient white


def test_16bit_rgb_scaled_not_clipped():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(32, 48, 3), dtype=np.uint16)

    image, _, _ = decode_image(png_bytes(values, 2), NO_RESIZE)

    assert np.abs(pixels(image) - np.rint(values / 257.0)).max() <= 1


def test_16bit_grey_color_key_transparency():
    values = np.full((6, 8), 60000, dtype=np.uint16)
    values[:, :3] = 1000
    expected = np.repeat(np.rint(values / 257.0)[..., None], 3, axis=-1)
    expected[:, :3] = (0, 0, 255)

    image, _, _ = decode_image(png_bytes(values, 0, key=(1000,)), ImageConfig(resize_mode="no", background=(0, 0, 255)))

    assert np.abs(pixels(image) - expected).max() <= 1


def test_16bit_rgb_color_key_transparency():
    values = np.zeros((6, 8, 3), dtype=np.uint16)
    values[...] = (50000, 0, 0)
    values[:, :3] = (1000, 2000, 3000)
    # 51400 is 200 in its high byte: an 8-bit pixel (200, 0, 0) is not the 16-bit key (200, 0, 0).
    values[:, 6:] = (51400, 0, 0)
    expected = np.rint(values / 257.0)
    expected[:, :3] = (0, 0, 255)

    keyed, _, _ = decode_image(png_bytes(values, 2, key=(1000, 2000, 3000)), ImageConfig(resize_mode="no", background=(0, 0, 255)))
    small_key, _, _ = decode_image(png_bytes(values, 2, key=(200, 0, 0)), ImageConfig(resize_mode="no", background=(0, 0, 255)))

    assert np.abs(pixels(keyed) - expected).max() <= 1
    assert np.abs(pixels(small_key)[:, 6:] - np.rint(values[:, 6:] / 257.0)).max() <= 1


def test_16bit_animated_rgba_decodes(dirty):
    result = process_image(read(dirty, "apng_mode_16bit.png"), NO_RESIZE)

    assert result.ok
    assert (result.width, result.height) == (128, 64)


@pytest.mark.parametrize("name", ["chi.gif", "iss634.gif", "iss634.webp", "dispose_bgnd_transparency.gif"])
def test_animation_uses_first_frame(dirty, name):
    raw = Image.open(dirty / name)
    raw.seek(0)
    first = raw.convert("RGBA")
    expected = composite(np.asarray(first)[..., :3].astype(np.float64), np.asarray(first)[..., 3], (255, 255, 255))

    image, _, _ = decode_image(read(dirty, name), NO_RESIZE)

    assert raw.n_frames > 1
    assert np.abs(pixels(image) - expected).max() <= 1


# ---------------------------------------------------------------- rejects


def test_generated_non_images():
    assert process_image(b"").reason == "empty_body"
    assert process_image(NGINX_404).reason == "not_an_image"
    assert process_image(SVG).reason == "not_an_image"
    assert process_image(b"\xef\xbb\xbf<!DOCTYPE html><html></html>").reason == "not_an_image"
    assert process_image(b'{"error": "not found"}').reason == "not_an_image"
    assert process_image(b"%PDF-1.7\n").reason == "not_an_image"
    assert process_image(b"%!PS-Adobe-3.0 EPSF-3.0\n").reason == "not_an_image"  # EPS would run Ghostscript


@pytest.mark.parametrize("name", ["hopper.jpg", "hopper.png", "hopper.gif", "hopper.webp", "hopper.bmp", "flower.jpg", "transparent.png"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_copies_rejected(dirty, name, fraction):
    data = read(dirty, name)

    result = process_image(data[: int(len(data) * fraction)])

    assert result.reason == "decode_error", result.detail


def test_pixel_limit_rejects_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buffer, format="PNG")

    result = process_image(buffer.getvalue(), ImageConfig(max_pixels=5_000_000))

    assert result.reason == "decompression_bomb"
    assert "3000x2000" in result.detail


def png_rows_missing(width: int, height: int) -> bytes:
    """Return a 1-bit PNG whose IDAT contains its first row and then breaks off, so it opens but cannot decode."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    compressor = zlib.compressobj()
    # A sync flush ends the block without ending the zlib stream, as a cut-off download does.
    pixels = compressor.compress(b"\x00" * (1 + (width + 7) // 8)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_pixel_limit_above_pillow_default(monkeypatch):
    # Decoding with a larger max_pixels raises Pillow's process-wide limit; restore it afterwards.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    # 210 M pixels is above twice Pillow's default MAX_IMAGE_PIXELS (2 x 89,478,485), where
    # Pillow itself raises DecompressionBombError on open. With max_pixels above the image, the
    # pixel check passes and the missing pixel data fails the decode instead.
    data = png_rows_missing(15_000, 14_000)

    raised = process_image(data, ImageConfig(max_pixels=300_000_000))
    default = process_image(data)

    assert raised.reason == "decode_error", raised.detail
    assert default.reason == "decompression_bomb"


RED = (200, 30, 30)
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def rgb_png(width: int, height: int, scanlines: bytes, interlaced: bool = False) -> bytes:
    """Return an 8-bit RGB PNG whose one IDAT chunk is a complete zlib stream of ``scanlines``."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")


def red_scanlines(width: int, rows: int) -> bytes:
    return b"".join(b"\x00" + bytes(RED) * width for _ in range(rows))


def red_adam7_passes(width: int, height: int) -> list[bytes]:
    """Return the scanlines of each non-empty Adam7 pass of an all-red image."""
    passes = []
    for first_column, first_row, column_step, row_step in ADAM7:
        columns = len(range(first_column, width, column_step))
        rows = len(range(first_row, height, row_step))
        if columns and rows:
            passes.append(red_scanlines(columns, rows))
    return passes


def test_png_complete_pixel_data_kept():
    # An 8x8 RGB row is 1 filter byte + 24 sample bytes, so the image needs 200 bytes.
    data = rgb_png(8, 8, red_scanlines(8, 8))

    image, size, source_format = decode_image(data, NO_RESIZE)

    assert size == (8, 8)
    assert source_format == "PNG"
    assert np.all(pixels(image) == RED)
    assert process_image(data).reason is None


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_png_short_pixel_data_rejected(rows):
    # Each row is 25 bytes and the zlib stream ends cleanly after ``rows`` of the 8 rows.
    data = rgb_png(8, 8, red_scanlines(8, rows))

    result = process_image(data)

    assert result.reason == "decode_error"
    assert result.detail == f"PNG pixel data ends after {25 * rows} of 200 bytes"
    assert result.jpeg is None


def test_png_stream_ending_mid_row_rejected():
    # Pillow itself raises when the stream ends inside a row, because it writes only whole rows.
    # The skipped recount for a nonzero last row relies on that.
    data = rgb_png(8, 8, red_scanlines(8, 7) + red_scanlines(8, 1)[:12])

    result = process_image(data)

    assert result.reason == "decode_error"
    assert result.jpeg is None


def test_png_interlaced_pixel_data_checked():
    # 10x7 RGB in Adam7 passes: 7 + 4 + 10 + 14 + 32 + 64 + 93 = 224 bytes, 131 without pass 7.
    passes = red_adam7_passes(10, 7)
    complete = rgb_png(10, 7, b"".join(passes), interlaced=True)
    short = rgb_png(10, 7, b"".join(passes[:-1]), interlaced=True)

    image, _, _ = decode_image(complete, NO_RESIZE)
    result = process_image(short)

    assert [len(scanlines) for scanlines in passes] == [7, 4, 10, 14, 32, 64, 93]
    assert np.all(pixels(image) == RED)
    assert result.reason == "decode_error"
    assert result.detail == "PNG pixel data ends after 131 of 224 bytes"


@pytest.mark.parametrize(
    "size, config",
    [
        ((70_000, 2), ImageConfig()),  # keep_ratio only shrinks, so 70,000 px wide stays, past JPEG's 65,500
        ((20_000, 300), ImageConfig(resize_mode="no", encode_format="webp")),  # past WebP's 16,383
    ],
)
def test_output_past_format_limit_rejected(size, config):
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")

    result = process_image(buffer.getvalue(), config)

    assert result.reason == "encode_error", result.detail
    assert result.jpeg is None
    assert f"{size[0]}x{size[1]}" in result.detail


def test_min_size_and_aspect_ratio(dirty):
    assert process_image(read(dirty, "tiny.png"), ImageConfig(min_size=10)).reason == "too_small"
    assert process_image(read(dirty, "old-style-jpeg-compression.png"), ImageConfig(max_aspect_ratio=3)).reason == "bad_aspect_ratio"
    assert process_image(read(dirty, "flower.jpg"), ImageConfig(min_size=300, max_aspect_ratio=3)).ok


# ---------------------------------------------------------------- resize and encode


@pytest.mark.parametrize(
    "mode, size",
    [("no", (480, 360)), ("keep_ratio", (341, 256)), ("keep_ratio_largest", (256, 192)), ("center_crop", (256, 256)), ("border", (256, 256))],
)
def test_resize_modes_on_photo(dirty, mode, size):
    result = process_image(read(dirty, "flower.jpg"), ImageConfig(resize_mode=mode))

    assert (result.width, result.height) == size
    assert (result.orig_width, result.orig_height) == (480, 360)


def test_border_pads_with_background(dirty):
    result = process_image(read(dirty, "flower.jpg"), ImageConfig(resize_mode="border", background=(0, 0, 0)))
    out = pixels(Image.open(io.BytesIO(result.jpeg)))

    assert out[:28].max() < 20  # 256x192 photo centred: 32 rows of padding above and below
    assert out[-28:].max() < 20
    assert out[100:150].mean() > 40


def test_small_image_upscaling_rules(dirty):
    data = read(dirty, "tiny.png")

    kept = process_image(data, ImageConfig(resize_mode="keep_ratio"))
    grown = process_image(data, ImageConfig(resize_mode="keep_ratio", resize_only_if_bigger=False))
    cropped = process_image(data, ImageConfig(resize_mode="center_crop", image_size=64))

    assert (kept.width, kept.height) == (4, 4)
    assert (grown.width, grown.height) == (256, 256)
    assert (cropped.width, cropped.height) == (64, 64)


def test_jpeg_draft_keeps_orig_size(dirty):
    result = process_image(read(dirty, "junk_jpeg_header.jpg"), ImageConfig(resize_mode="center_crop", image_size=128))

    assert (result.orig_width, result.orig_height) == (1024, 768)
    assert (result.width, result.height) == (128, 128)


def test_center_crop_takes_centre():
    source = Image.new("RGB", (300, 100), (255, 0, 0))
    source.paste((0, 255, 0), (100, 0, 200, 100))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")

    image, _, _ = decode_image(buffer.getvalue(), NO_RESIZE)
    out = pixels(resize(image, ImageConfig(resize_mode="center_crop", image_size=50)))

    assert out[:, 2:-2, 1].min() > 240
    assert out[:, 2:-2, 0].max() < 15


def test_webp_output(dirty):
    result = process_image(read(dirty, "hopper.jpg"), ImageConfig(encode_format="webp", webp_quality=80))

    assert result.jpeg[:4] == b"RIFF"
    assert result.jpeg[8:12] == b"WEBP"
    assert result.encode_format == "webp"
    assert Image.open(io.BytesIO(result.jpeg)).size == (128, 128)


def test_invalid_config_rejected():
    with pytest.raises(ValueError, match="resize_mode"):
        ImageConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="encode_format"):
        ImageConfig(encode_format="png")
    with pytest.raises(ValueError, match="interpolation 'lanczos3'"):
        ImageConfig(upscale_interpolation="lanczos3")
    with pytest.raises(ValueError, match="interpolation 'box'"):
        ImageConfig(downscale_interpolation="box")


# ---------------------------------------------------------------- interpolation

# Each 2x2 block averages exactly in both of Pillow's passes (rows first, then columns), so the
# area filter must give these block means: (0+40+80+120)/4, 100, 10, (100+200+0+60)/4.
BLOCKS = np.array([[0, 40, 100, 100], [80, 120, 100, 100], [10, 10, 0, 200], [10, 10, 100, 60]], dtype=np.uint8)
BLOCK_MEANS = [[60, 100], [10, 90]]


@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border"])
def test_downscale_averages_blocks(mode):
    image = Image.fromarray(BLOCKS).convert("RGB")

    out = pixels(resize(image, ImageConfig(resize_mode=mode, image_size=2)))

    for channel in range(3):
        assert out[..., channel].tolist() == BLOCK_MEANS


def test_downscale_interpolation_option():
    image = Image.fromarray(BLOCKS).convert("RGB")
    cfg = ImageConfig(resize_mode="keep_ratio", image_size=2, downscale_interpolation="lanczos")

    out = pixels(resize(image, cfg))

    assert out[..., 0].tolist() != BLOCK_MEANS
    assert (out == pixels(image.resize((2, 2), Image.Resampling.LANCZOS))).all()


def test_upscale_uses_lanczos():
    image = Image.fromarray(BLOCKS).convert("RGB")
    cfg = ImageConfig(resize_mode="center_crop", image_size=8)

    out = pixels(resize(image, cfg))

    assert (out == pixels(image.resize((8, 8), Image.Resampling.LANCZOS))).all()
    assert (out != pixels(image.resize((8, 8), Image.Resampling.BOX))).any()


# ---------------------------------------------------------------- pHash


def imagehash_phash(image: Image.Image) -> int:
    return int(str(imagehash.phash(image)), 16)


@pytest.mark.parametrize(
    "name", ["flower.jpg", "hopper.png", "hopper_orientation_6.jpg", "pil_sample_cmyk.jpg", "transparent.png", "tiny.png"]
)
def test_phash_matches_imagehash_on_files(dirty, name):
    image, _, _ = decode_image(read(dirty, name), NO_RESIZE)

    assert compute_phash(image) == imagehash_phash(image)


def generated_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    images = {}
    for colour in (0, 128, 255):
        # Every AC coefficient is 0, so the median ties with most of them.
        images[f"flat RGB {colour}"] = Image.new("RGB", (64, 48), (colour, colour, colour))
        images[f"flat L {colour}"] = Image.new("L", (5, 700), colour)
    for width, height in ((1, 1), (2, 3), (31, 33), (32, 32), (1000, 10)):
        images[f"noise {width}x{height}"] = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ramp = np.linspace(0, 255, width).astype(np.uint8)
        images[f"ramp {width}x{height}"] = Image.fromarray(np.tile(ramp, (height, 1)))
        checker = (np.indices((height, width)).sum(axis=0) % 2 * 255).astype(np.uint8)
        images[f"checkerboard {width}x{height}"] = Image.fromarray(checker)
    return images


@pytest.mark.parametrize("name, image", list(generated_images().items()))
def test_phash_matches_imagehash_generated(name, image):
    assert compute_phash(image) == imagehash_phash(image)


def test_phash_matches_imagehash_on_flickr8k(shared_raw):
    folder = shared_raw / "flickr8k-images" / "images"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    paths = sorted(folder.glob("*.jpg"))[:1000]

    mismatches = []
    for path in paths:
        image, _, _ = decode_image(path.read_bytes(), NO_RESIZE)
        if compute_phash(image) != imagehash_phash(image):
            mismatches.append(path.name)

    assert len(paths) == 1000
    assert mismatches == []
