"""Record schema helpers: URL normalization, uid, rejects."""

from __future__ import annotations

import json

from bm6b.schemas import REJECT_SCHEMA, RECORD_SCHEMA, make_reject, make_uid, new_record, normalize_url, record_to_row
from bm6b.schemas.reasons import REASONS, is_retryable


def test_normalize_url_cases():
    assert normalize_url("HTTP://Example.COM:80/a/b.jpg#top") == "http://example.com/a/b.jpg"
    assert normalize_url("https://example.com:443") == "https://example.com/"
    assert normalize_url("https://example.com:8443/x") == "https://example.com:8443/x"
    assert normalize_url("http://example.com/x.jpg?utm_source=a&id=7&fbclid=z") == "http://example.com/x.jpg?id=7"
    assert normalize_url("http://[::1]:8080/x") == "http://[::1]:8080/x"
    # An internationalized host and its punycode spelling are the same URL.
    assert normalize_url("http://例子.测试/a.jpg") == "http://xn--fsqu00a.xn--0zwm56d/a.jpg"
    assert normalize_url("http://xn--fsqu00a.xn--0zwm56d/a.jpg") == "http://xn--fsqu00a.xn--0zwm56d/a.jpg"


def test_uid_depends_on_url_and_captions():
    base = make_uid("http://example.com/a.jpg", ["一只猫", "a cat"])
    assert base == make_uid("HTTP://EXAMPLE.com:80/a.jpg#x", ["一只猫", "a cat"])
    assert base != make_uid("http://example.com/a.jpg", ["一只狗", "a cat"])
    assert len(base) == 32
    assert int(base, 16) >= 0


def test_record_has_every_schema_field():
    record = new_record(key="k", uid="u", url="http://e/x", source="m.csv", source_row=0, caption_en="a")
    row = record_to_row(record)
    assert list(row) == RECORD_SCHEMA.names
    assert row["schema_version"] == 1


def test_reject_row_matches_schema():
    record = new_record(key="k", uid="u", url="http://e/x", source="m.csv", source_row=4, caption_zh="猫")
    reject = make_reject(record, stage="download", reason="http_404", detail="HTTP 404")
    assert list(reject) == REJECT_SCHEMA.names
    assert json.loads(reject["input"])["caption_zh"] == "猫"
    assert (reject["stage"], reject["reason"], reject["source_row"]) == ("download", "http_404", 4)


def test_reason_codes_are_unique_and_retryable_subset():
    assert len(REASONS) == len(set(REASONS))
    for reason in ("timeout", "http_429", "http_5xx"):
        assert is_retryable(reason), reason
    for reason in ("http_404", "duplicate_image"):
        assert not is_retryable(reason), reason
