"""Manifest reading: formats, column mapping, bad rows."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bm6b.pipelines import ingest
from bm6b.schemas import make_key

ROWS = [
    {"url": "http://example.test/a.jpg", "caption_en": "A cat .", "caption_zh": "一只猫。"},
    {"url": "https://example.test/b.png", "caption_en": "Two dogs .", "caption_zh": ""},
]


def read_all(path, columns=ingest.ColumnMap()):
    out = []
    for row, fields, resolved in ingest.iter_manifest(str(path), columns):
        out.append(ingest.row_to_record(str(path), row, fields, resolved))
    return out


def write_csv(path, delimiter, rows, header=("url", "caption_en", "caption_zh")):
    lines = [delimiter.join(header)] + [delimiter.join(r.get(h, "") for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl", "m.jsonl.gz", "m.parquet", "m.csv.gz"])
def test_formats_give_same_records(tmp_path, name):
    path = tmp_path / name
    if name.startswith("m.csv") or name == "m.tsv":
        plain = tmp_path / ("plain.tsv" if name == "m.tsv" else "plain.csv")
        write_csv(plain, "\t" if name == "m.tsv" else ",", ROWS)
        data = plain.read_bytes()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    elif name.startswith("m.jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode()
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)

    results = read_all(path)
    assert [kind for kind, _ in results] == ["record", "record"]
    first, second = results[0][1], results[1][1]
    assert first["url"] == "http://example.test/a.jpg"
    assert first["caption_zh"] == "一只猫。"
    assert first["caption_en"] == "A cat ."
    assert first["key"] == make_key(str(path), 0)
    assert (first["source"], first["source_row"]) == (str(path), 0)
    assert second["caption_zh"] is None  # empty string means no caption
    assert second["source_row"] == 1


def test_key_is_stable_and_dotless():
    assert make_key("a.csv", 3) == make_key("a.csv", 3)
    assert make_key("a.csv", 3) != make_key("a.csv", 4)
    assert make_key("a.csv", 3) != make_key("b.csv", 3)
    key = make_key("dir/x.v2.parquet", 0)
    assert "." not in key
    assert len(key) == 16


def test_bad_json_row_becomes_named_reject(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"url": "http://example.test/a.jpg", "caption": "ok"}\n{"url": broken\n[1, 2]\n', encoding="utf-8")
    results = read_all(path)
    assert [kind for kind, _ in results] == ["record", "reject", "reject"]
    reject = results[1][1]
    assert reject["stage"] == "ingest"
    assert reject["reason"] == "bad_row"
    assert reject["detail"].startswith(f"{path} source_row 1: invalid JSON")
    assert results[2][1]["detail"] == f"{path} source_row 2: invalid JSON: a JSON list, not an object"


def test_csv_row_with_wrong_field_count_is_rejected(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("url,caption\nhttp://example.test/a.jpg,a cat\nhttp://example.test/b.jpg,a,b\n", encoding="utf-8")
    kinds = [(kind, value.get("reason")) for kind, value in read_all(path)]
    assert kinds == [("record", None), ("reject", "bad_row")]


def test_missing_and_invalid_urls(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("url,caption\n,a cat\nftp://example.test/x.jpg,a dog\n/relative.jpg,a cow\n", encoding="utf-8")
    reasons = [value["reason"] for _, value in read_all(path)]
    assert reasons == ["missing_url", "invalid_url", "invalid_url"]


def test_single_caption_column_is_detected(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("URL,TEXT\nhttp://example.test/a.jpg,一只猫\n", encoding="utf-8")
    kind, record = read_all(path)[0]
    assert kind == "record"
    assert record["captions"] == ["一只猫"]
    assert record["caption_zh"] is None
    assert record["caption_en"] is None


def test_explicit_columns_override_detection(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("link,zh_text,en_text\nhttp://example.test/a.jpg,一只猫,a cat\n", encoding="utf-8")
    columns = ingest.ColumnMap(url_col="link", caption_zh_col="zh_text", caption_en_col="en_text")
    kind, record = read_all(path, columns)[0]
    assert (record["url"], record["caption_zh"], record["caption_en"]) == ("http://example.test/a.jpg", "一只猫", "a cat")


def test_missing_named_column_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("url,caption\nhttp://example.test/a.jpg,a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"column 'title' \(--caption-en-col\) not found"):
        ingest.check_manifest(str(path), ingest.ColumnMap(caption_en_col="title"))


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown manifest format"):
        ingest.manifest_format(str(tmp_path / "m.xlsx"))


def test_parquet_is_streamed_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_ROWS", 7)
    rows = [{"url": f"http://example.test/{i}.jpg", "caption": f"photo {i}"} for i in range(30)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    results = read_all(path)
    assert [r["source_row"] for _, r in results] == list(range(30))
    assert results[29][1]["url"] == "http://example.test/29.jpg"


def test_laion_parquet_columns_are_detected(shared_raw):
    path = shared_raw / "laion400m-sample-img2dataset" / "laion400m_sample_5000.parquet"
    resolved = ingest.check_manifest(str(path), ingest.ColumnMap())
    assert resolved.url_col == "URL"
    assert resolved.caption_col == "TEXT"


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffurl,caption_en\r\nhttp://example.test/a.jpg,A cat .\r\n".encode("utf-8"))
    kind, record = read_all(path)[0]
    assert kind == "record"
    assert record["url"] == "http://example.test/a.jpg"


def test_lone_surrogate_in_json_is_bad_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"url": "http://example.test/a.jpg", "caption_en": "Brick wall \\ud800 texture."}\n', encoding="utf-8")
    kind, reject = read_all(path)[0]
    assert kind == "reject"
    assert reject["reason"] == "bad_row"
    assert reject["detail"] == (
        f"{path} source_row 0: invalid cell: column 'caption_en' is not valid UTF-8 text (invalid bytes or a lone surrogate)"
    )
    assert reject["input"] == '{"url": "http://example.test/a.jpg", "caption_en": "Brick wall ? texture."}'


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_invalid_utf8_caption_is_bad_row(tmp_path, name):
    # "\xe7\x8c" is the first two bytes of 猫 (e7 8c ab): a caption cut inside a character.
    path = tmp_path / name
    if name.endswith(".csv"):
        body = b"url,caption_zh\nhttp://example.test/a.jpg,\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\nhttp://example.test/b.jpg,\xe7\x8c\xab\n"
    else:
        body = (
            b'{"url": "http://example.test/a.jpg", "caption_zh": "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c"}\n'
            b'{"url": "http://example.test/b.jpg", "caption_zh": "\xe7\x8c\xab"}\n'
        )
    path.write_bytes(body)
    (kind0, first), (kind1, second) = read_all(path)
    assert kind0 == "reject"
    assert first["reason"] == "bad_row"
    assert first["detail"].endswith("column 'caption_zh' is not valid UTF-8 text (invalid bytes or a lone surrogate)")
    assert kind1 == "record"
    assert second["caption_zh"] == "猫"


def test_non_text_cells_are_bad_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"url": "http://example.test/a.jpg", "caption_en": {"text": "nested"}}\n'
        '{"url": "http://example.test/b.jpg", "caption_en": "ok", "caption_zh": ["列表"]}\n'
        '{"url": "http://example.test/c.jpg", "caption_en": 1.5}\n',
        encoding="utf-8",
    )
    results = read_all(path)
    assert [value.get("reason") for _, value in results] == ["bad_row", "bad_row", None]
    assert results[0][1]["detail"] == f"{path} source_row 0: invalid cell: column 'caption_en' contains a dict, expected text"
    assert results[1][1]["detail"] == f"{path} source_row 1: invalid cell: column 'caption_zh' contains a list, expected text"
    assert results[2][1]["caption_en"] == "1.5"


def test_long_csv_field_is_read(tmp_path):
    path = tmp_path / "m.csv"
    caption = "a" * 300_000
    path.write_text(f"url,caption_en\nhttp://example.test/a.jpg,{caption}\n", encoding="utf-8")
    assert read_all(path)[0][1]["caption_en"] == caption


def test_file_named_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "m.csv.gz"
    path.write_text("url,caption\nhttp://example.test/a.jpg,a cat\n", encoding="utf-8")
    with pytest.raises(ingest.ManifestError, match=r"m.csv.gz: unreadable from source_row 0 \(0-based data row\) on: BadGzipFile"):
        ingest.check_manifest(str(path), ingest.ColumnMap())


def test_truncated_gzip_keeps_rows_before_the_break(tmp_path):
    rows = "".join(f'{{"url": "http://example.test/{i}.jpg", "caption": "photo number {i} of many"}}\n' for i in range(2000))
    data = gzip.compress(rows.encode())
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(ingest.ManifestError) as caught:
        for row, fields, resolved in ingest.iter_manifest(str(path), ingest.ColumnMap()):
            seen.append(row)
    assert seen == list(range(len(seen)))
    assert 0 < len(seen) < 2000
    assert caught.value.row == len(seen)
