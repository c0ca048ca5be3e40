"""Image format detection from the first bytes of a body (magic numbers), ignoring Content-Type.

Servers often label error pages, SVG or arbitrary files as ``image/jpeg``; the bytes decide.
"""

from __future__ import annotations

SNIFF_BYTES = 32  # enough for every signature below

# Pillow plugin ids accepted for decoding; everything else is rejected as not_an_image. This also
# keeps Pillow away from formats that run external programs (EPS through Ghostscript).
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_AVIF_BRANDS = (b"avif", b"avis")


def sniff_image_format(head: bytes) -> str | None:
    """Return the Pillow format name that ``head`` starts with, or None when it is no supported image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 18:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS:
        return "AVIF"
    return None


def describe_non_image(head: bytes) -> str:
    """Return a short human-readable guess of what a non-image body is, for reject details."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head:
        return "empty body"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG (vector) image"
    if text.startswith(b"<?xml"):
        return "an XML document"
    if text.startswith((b"{", b"[")):
        return "JSON"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "an OLE2 document (e.g. .doc)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    return f"unknown data starting {head[:8].hex()}"
