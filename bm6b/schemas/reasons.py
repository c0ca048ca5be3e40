"""Reason codes for rejected samples.

Every row that does not reach a shard lands in the rejects table with exactly one of these codes,
the stage that rejected it, and a human-readable detail. The codes are stable strings: reports,
the "retry failed" mode and downstream tools match on them.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    # ingest
    BAD_ROW = "bad_row"  # the manifest row could not be parsed (broken JSON, wrong column count)
    MISSING_URL = "missing_url"  # the URL column is absent or empty
    INVALID_URL = "invalid_url"  # not an absolute http(s) URL
    DUPLICATE_URL = "duplicate_url"  # another row has the same normalized URL; the detail names the kept key

    # download
    DNS = "dns"  # the host name did not resolve
    CONNECT = "connect"  # the TCP or TLS connection failed or was refused
    TIMEOUT = "timeout"  # a connect, read or total deadline expired
    RESET = "reset"  # the peer closed or reset the connection mid-response
    TOO_LARGE = "too_large"  # the body exceeded the byte cap
    TOO_SLOW = "too_slow"  # the transfer rate fell below the minimum throughput
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_ERROR = "http_error"  # any HTTP status without its own code; the detail holds the status
    HTTP_404 = "http_404"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    OPTED_OUT = "opted_out"  # X-Robots-Tag or robots.txt forbids AI use
    BLOCKED_ADDRESS = "blocked_address"  # SSRF guard: loopback, private, link-local, ... address
    UNSUPPORTED_SCHEME = "unsupported_scheme"  # not http or https
    HOST_FAILING = "host_failing"  # the host's circuit breaker is open after repeated failures
    # An img2dataset tar shard lacks this sample's data: the tar is cut off or damaged before it
    # ends, or it lacks a sample that its metadata parquet lists as downloaded. The URL can be
    # fetched again, so the "retry failed" mode re-runs it.
    TRUNCATED_SHARD = "truncated_shard"
    # An exception of a type that no check expects, raised while fetching or decoding. The detail
    # names the type. It points to a bug, so the "retry failed" mode does not re-run it.
    UNEXPECTED_ERROR = "unexpected_error"

    # decode
    EMPTY_BODY = "empty_body"
    NOT_AN_IMAGE = "not_an_image"  # magic bytes match no supported image format (HTML, SVG, ...)
    DECODE_ERROR = "decode_error"  # truncated or corrupt image data
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than the configured maximum
    TOO_SMALL = "too_small"  # below the minimum image size
    BAD_ASPECT_RATIO = "bad_aspect_ratio"  # above the maximum aspect ratio
    ENCODE_ERROR = "encode_error"  # the output image could not be encoded, e.g. wider than the format allows

    # captions
    EMPTY_CAPTION = "empty_caption"  # no caption left after normalization
    UNSUPPORTED_LANGUAGE = "unsupported_language"  # a caption detected as neither zh nor en
    CAPTION_FILTERED = "caption_filtered"  # a caption quality rule dropped every caption
    TRANSLATION_MISMATCH = "translation_mismatch"  # zh and en captions are not translations

    # dedup
    DUPLICATE_IMAGE = "duplicate_image"  # same image sha256 as the kept key in the detail
    NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
    DUPLICATE_CAPTION = "duplicate_caption"
    EVAL_CONTAMINATION = "eval_contamination"

    # clip
    LOW_CLIP_SCORE = "low_clip_score"


REASONS: tuple[str, ...] = tuple(r.value for r in Reason)

# Failures that may succeed on a later attempt; the "retry failed" mode re-runs only these.
RETRYABLE: frozenset[str] = frozenset(
    {
        Reason.DNS.value,
        Reason.CONNECT.value,
        Reason.TIMEOUT.value,
        Reason.RESET.value,
        Reason.TOO_SLOW.value,
        Reason.HTTP_429.value,
        Reason.HTTP_5XX.value,
        Reason.HOST_FAILING.value,
        Reason.TRUNCATED_SHARD.value,
    }
)


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE
