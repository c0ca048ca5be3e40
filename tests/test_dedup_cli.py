"""``bm6b dedup`` on shards built from real photos: every step, rejects and stats."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from bm6b.cli import main
from bm6b.filters.image import compute_phash
from bm6b.pipelines.shards import write_shard
from bm6b.schemas import make_key, new_record


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _record(row: int, image: Image.Image, data: bytes, zh: str | None, en: str | None, url: str) -> dict:
    import hashlib

    record = new_record(key=make_key("photos.tsv", row), uid=f"{row:032x}", url=url, source="photos.tsv",
                        source_row=row, caption_zh=zh, caption_en=en)
    record.update(image=data, sha256=hashlib.sha256(data).hexdigest(), phash=compute_phash(image),
                  width=image.width, height=image.height, orig_width=image.width, orig_height=image.height)
    return record


def test_dedup_command_on_shards(shared_raw, tmp_path):
    folder = shared_raw / "flickr8k-images" / "images"
    names = sorted(p.name for p in folder.iterdir())[:10]
    photos = [Image.open(folder / name).convert("RGB") for name in names]
    records = []
    for row, (name, photo) in enumerate(zip(names, photos)):
        records.append(_record(row, photo, _jpeg(photo), f"第{row}张照片里的场景", f"scene of photo number {row}",
                               f"http://127.0.0.1/{name}"))
    # Row 10: photo 0 again, same bytes (sha256 duplicate). Row 11: photo 1 resized (near duplicate).
    records.append(_record(10, photos[0], records[0]["image"], None, "another caption", "http://127.0.0.1/copy0.jpg"))
    small = photos[1].resize((photos[1].width // 2, photos[1].height // 2))
    records.append(_record(11, small, _jpeg(small, 40), None, "a resized copy", "http://127.0.0.1/copy1.jpg"))
    # Row 12: same URL as row 2 after normalization. Row 13: a new, smaller image with row 3's captions.
    records.append(_record(12, photos[2], _jpeg(photos[2], 70), None, "mirror", "HTTP://127.0.0.1:80/" + names[2] + "#x"))
    dark = ImageEnhance.Brightness(photos[4]).enhance(0.2).rotate(90, expand=True).resize((60, 80))
    records.append(_record(13, dark, _jpeg(dark), records[3]["caption_zh"], records[3]["caption_en"], "http://127.0.0.1/r13.jpg"))
    # Photo 5 is in the evaluation set (a re-encoded copy).
    eval_folder = tmp_path / "evalset"
    eval_folder.mkdir()
    photos[5].resize((120, 90)).save(eval_folder / "val_0001.jpg", quality=60)

    shards = tmp_path / "in"
    shards.mkdir()
    write_shard(str(shards), 0, records[:7])
    write_shard(str(shards), 1, records[7:])
    by_row = {r["source_row"]: r["key"] for r in records}

    out = tmp_path / "out"
    code = main(["dedup", str(shards), "-o", str(out), "--eval-set", f"mini={eval_folder}", "--runner=FnApiRunner"])
    assert code == 0

    kept = pq.read_table(sorted(out.glob("[0-9]*.parquet"))).to_pylist()
    rejects = pq.read_table(sorted((out / "rejects").glob("*.parquet"))).to_pylist()
    assert len(kept) + len(rejects) == len(records)
    reasons = {r["key"]: (r["stage"], r["reason"], r["detail"]) for r in rejects}
    assert reasons == {
        by_row[12]: ("dedup_url", "duplicate_url", f"same normalized URL as kept key {by_row[2]}"),
        by_row[10]: ("dedup_image", "duplicate_image", f"same sha256 as kept key {by_row[0]}"),
        by_row[5]: ("decontam", "eval_contamination", reasons[by_row[5]][2]),
        by_row[11]: ("dedup_near_image", "near_duplicate_image", reasons[by_row[11]][2]),
        by_row[13]: ("dedup_caption", "duplicate_caption",
                     f"caption_zh duplicates kept key {by_row[3]}; caption_en duplicates kept key {by_row[3]}"),
    }
    assert reasons[by_row[5]][2].startswith("image within pHash Hamming distance ")
    assert reasons[by_row[5]][2].endswith(" of eval image mini:val_0001.jpg")
    assert reasons[by_row[11]][2].startswith(f"near duplicate of kept key {by_row[1]} (pHash Hamming distance ")

    stats = json.loads((out / "stats.json").read_text())
    assert [s["stage"] for s in stats["stages"]] == [
        "ingest", "dedup_url", "dedup_image", "decontam", "dedup_near_image", "dedup_caption", "write"
    ]
    assert stats["kept"] == len(kept) == 9
    assert stats["rejected"] == 5


def test_dedup_command_rejects_same_folder(tmp_path, capsys):
    assert main(["dedup", str(tmp_path), "-o", str(tmp_path)]) == 2


def test_dedup_command_without_shards(tmp_path):
    assert main(["dedup", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2


def _small_shards(tmp_path, drop: str | None = None):
    import pyarrow.parquet as pq_module

    shards = tmp_path / "in"
    shards.mkdir(parents=True)
    records = []
    for row in range(3):
        image = Image.new("RGB", (32, 32), (80 * row, 40, 200 - 60 * row))
        records.append(_record(row, image, _jpeg(image), f"第{row}张照片", f"photo number {row}", f"http://127.0.0.1/{row}.jpg"))
    write_shard(str(shards), 0, records)
    if drop:
        path = shards / "00000.parquet"
        pq_module.write_table(pq_module.read_table(path).drop([drop]), path)
    return shards


def test_dedup_command_missing_columns(tmp_path, caplog):
    for column in ("sha256", "phash"):
        shards = _small_shards(tmp_path / column, drop=column)
        out = tmp_path / column / "out"
        assert main(["dedup", str(shards), "-o", str(out), "--runner=FnApiRunner"]) == 2
        assert f"missing column {column}" in caplog.text
        assert "00000.parquet" in caplog.text
        assert not out.exists()


def test_dedup_command_int64_phash_column(tmp_path):
    # A shard written with phash as int64 (by pandas or other tools) stores codes >= 2**63 as
    # negative numbers. They must cluster and be written back as the same unsigned codes.
    import pyarrow as pa
    import pyarrow.parquet as pq_module

    shards = tmp_path / "in"
    shards.mkdir()
    codes = [(1 << 64) - 1, (1 << 64) - 2, 5]  # the first two are 1 bit apart
    records = []
    for row, code in enumerate(codes):
        image = Image.new("RGB", (16, 16), (row * 50, 0, 0))
        record = _record(row, image, _jpeg(image), None, f"distinct caption number {row}", f"http://127.0.0.1/{row}.jpg")
        record["phash"] = code
        record["sha256"] = f"{row:064x}"
        records.append(record)
    write_shard(str(shards), 0, records)
    path = shards / "00000.parquet"
    table = pq_module.read_table(path)
    signed = pa.array([code - (1 << 64) if code >= 1 << 63 else code for code in codes], pa.int64())
    table = table.set_column(table.schema.get_field_index("phash"), pa.field("phash", pa.int64()), signed)
    pq_module.write_table(table, path)

    out = tmp_path / "out"
    assert main(["dedup", str(shards), "-o", str(out), "--near-dup-radius", "2", "--runner=FnApiRunner"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == 2
    assert stats["rejects_by_reason"] == {"near_duplicate_image": 1}
    assert sorted(pq_module.read_table(out / "00000.parquet").column("phash").to_pylist()) == [5, (1 << 64) - 1]
    [reject] = pq_module.read_table(out / "rejects" / "rejects-00000-of-00001.parquet").to_pylist()
    assert reject["detail"].endswith("(pHash Hamming distance 1)")


def test_dedup_command_phash_of_wrong_type(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq_module

    shards = _small_shards(tmp_path)
    path = shards / "00000.parquet"
    table = pq_module.read_table(path)
    hex_codes = pa.array([f"{code:016x}" for code in table.column("phash").to_pylist()])
    table = table.set_column(table.schema.get_field_index("phash"), pa.field("phash", pa.string()), hex_codes)
    pq_module.write_table(table, path)
    out = tmp_path / "out"
    assert main(["dedup", str(shards), "-o", str(out), "--runner=FnApiRunner"]) == 2
    assert "has phash of type string; expected uint64" in caplog.text
    assert not out.exists()


def test_dedup_command_table_bits_need_sampled(tmp_path, caplog):
    # The bits set the sampled tables only; with auto or pigeonhole they were silently ignored.
    shards = _small_shards(tmp_path)
    for candidates in ("auto", "pigeonhole"):
        out = tmp_path / f"out-{candidates}"
        argv = ["dedup", str(shards), "-o", str(out), "--near-dup-candidates", candidates,
                "--near-dup-table-bits", "12", "--runner=FnApiRunner"]
        assert main(argv) == 2
        assert f"applies only to --near-dup-candidates sampled, not {candidates}" in caplog.text
        assert not out.exists()
    out = tmp_path / "out-sampled"
    argv = ["dedup", str(shards), "-o", str(out), "--near-dup-candidates", "sampled", "--near-dup-table-bits", "12",
            "--runner=FnApiRunner"]
    assert main(argv) == 0
    assert json.loads((out / "stats.json").read_text())["dedup"]["sampled_bits"] == 12


def test_dedup_command_samples_per_shard_below_one(tmp_path, capsys):
    shards = _small_shards(tmp_path)
    for value in ("0", "-3"):
        out = tmp_path / f"out{value}"
        with pytest.raises(SystemExit) as exit_info:
            main(["dedup", str(shards), "-o", str(out), "--samples-per-shard", value])
        assert exit_info.value.code == 2
        assert f"must be at least 1, got {value}" in capsys.readouterr().err
        assert not out.exists()


def test_dedup_command_reports_unconverged_components(tmp_path, caplog):
    # 30 pHash codes in a chain, one bit apart: radius 1 links only neighbours, and one round pair
    # of large-star/small-star cannot reduce a 30-node chain to one star. The flips alternate
    # between the low and the high 32 bits (the two pigeonhole bands at radius 1), so each band
    # group contains one link of the chain and cannot join the chain by itself.
    shards = tmp_path / "in"
    shards.mkdir()
    records = []
    code = 0
    for row in range(30):
        image = Image.new("RGB", (16, 16), (row, 0, 0))
        record = _record(row, image, _jpeg(image), None, f"distinct caption number {row}", f"http://127.0.0.1/{row}.jpg")
        record["phash"] = code
        record["sha256"] = f"{row:064x}"  # near-black JPEGs can share bytes, and exact dedup would cut the chain
        code |= 1 << (row // 2 + (32 if row % 2 else 0))
        records.append(record)
    write_shard(str(shards), 0, records)

    base = ["dedup", str(shards), "--near-dup-radius", "1", "--no-caption-dedup", "--runner=FnApiRunner"]
    assert main([*base, "-o", str(tmp_path / "one"), "--components-rounds", "1"]) == 0
    stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert stats["dedup"]["unconverged_nodes"] > 0
    assert stats["kept"] > 1
    assert "did not converge" in caplog.text

    caplog.clear()
    assert main([*base, "-o", str(tmp_path / "eight")]) == 0
    stats = json.loads((tmp_path / "eight" / "stats.json").read_text())
    assert stats["dedup"]["unconverged_nodes"] == 0
    assert stats["kept"] == 1
    assert "did not converge" not in caplog.text


def test_dedup_command_unreadable_shard_files(tmp_path, caplog):
    missing_tar = _small_shards(tmp_path / "missing_tar")
    (missing_tar / "00000.tar").unlink()
    empty_parquet = _small_shards(tmp_path / "empty_parquet")
    (empty_parquet / "00001.parquet").write_bytes(b"")
    (empty_parquet / "00001.tar").write_bytes(b"")
    cases = [(missing_tar, "00000.tar not found"), (empty_parquet, "00001.parquet is not a readable Parquet file")]
    for shards, message in cases:
        out = shards.parent / "out"
        assert main(["dedup", str(shards), "-o", str(out), "--runner=FnApiRunner"]) == 2
        assert message in caplog.text
        assert not out.exists()


def _cut_tar(shards, member_suffix: str, into: int) -> tuple[list[str], int, int]:
    """Cut ``00000.tar`` ``into`` bytes past the header of the second sample's ``member_suffix`` member.

    Return the shard's keys in tar order, that member's header offset and the new file size.
    """
    path = shards / "00000.tar"
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    keys = sorted({member.name.split(".")[0] for member in members})
    header = next(member.offset for member in members if member.name == keys[1] + member_suffix)
    path.write_bytes(data[: header + into])
    return keys, header, header + into


@pytest.mark.parametrize(
    "into, error",
    [(812, "unexpected end of data"), (100, "partial header")],  # 300 bytes into the image data, or inside its header
)
def test_read_shard_cut_tar_keeps_readable_rows(tmp_path, into, error):
    from bm6b.dedup.run import read_shard

    shards = _small_shards(tmp_path)
    with tarfile.open(shards / "00000.tar") as tar:
        first_image = tar.extractfile(tar.getmembers()[0]).read()  # KEY.jpg of the first sample
    keys, header, size = _cut_tar(shards, ".jpg", into)
    tar_path = str(shards / "00000.tar")

    records, rejects = read_shard(str(shards / "00000.parquet"))

    assert [record["key"] for record in records] == keys[:1]
    assert records[0]["image"] == first_image
    assert records[0]["image_format"] == "jpg"
    assert records[0]["caption_en"] == f"photo number {records[0]['source_row']}"
    assert [reject["key"] for reject in rejects] == keys[1:]
    assert {(reject["stage"], reject["reason"]) for reject in rejects} == {("ingest", "truncated_shard")}
    assert rejects[0]["detail"] == f"its tar member in {tar_path} is cut off at byte {header} of {size} ({error})"
    assert rejects[1]["detail"] == f"{tar_path} is cut off or damaged at byte {header} of {size} ({error}) before its image"
    assert rejects[1]["url"].startswith("http://127.0.0.1/")


def test_read_shard_damaged_parquet_rows(tmp_path):
    import pyarrow.parquet as pq

    from bm6b.dedup.run import check_shards, read_shard

    shards = _small_shards(tmp_path)
    path = shards / "00000.parquet"
    data = bytearray(path.read_bytes())
    # Overwrite the start of the first data page and keep the footer, which contains the schema.
    first_page = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[first_page : first_page + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))

    check_shards([str(path)])
    with pytest.raises(ValueError, match=r"00000\.parquet has a readable schema but its rows cannot be read"):
        read_shard(str(path))


def test_read_shard_unreadable_tar_rejects_rows(tmp_path):
    from bm6b.dedup.run import read_shard

    shards = _small_shards(tmp_path)
    (shards / "00000.tar").write_bytes(b"not a tar file" * 10)

    records, rejects = read_shard(str(shards / "00000.parquet"))

    assert records == []
    assert len(rejects) == 3
    assert {reject["reason"] for reject in rejects} == {"truncated_shard"}
    assert rejects[0]["detail"].endswith("00000.tar is cut off or damaged at byte 0 of 140 (truncated header) before its image")


def test_read_shard_missing_member_rejected(tmp_path):
    from bm6b.dedup.run import read_shard

    shards = _small_shards(tmp_path)
    path = shards / "00000.tar"
    buffer = io.BytesIO()
    with tarfile.open(path) as source, tarfile.open(fileobj=buffer, mode="w") as target:
        keys = sorted({name.split(".")[0] for name in source.getnames()})
        for member in source.getmembers():
            if not member.name.startswith(keys[2]):
                target.addfile(member, source.extractfile(member))
    path.write_bytes(buffer.getvalue())

    records, rejects = read_shard(str(shards / "00000.parquet"))

    assert [record["key"] for record in records] == keys[:2]
    assert [reject["key"] for reject in rejects] == keys[2:]
    assert rejects[0]["detail"] == f"{path} does not contain its image, which {shards / '00000.parquet'} lists"


def test_read_shard_webp_member(tmp_path):
    from bm6b.dedup.run import read_shard

    image = Image.new("RGB", (16, 16), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP")
    record = _record(0, image, buffer.getvalue(), None, "a green square", "http://127.0.0.1/green.webp")
    record["image_format"] = "webp"
    write_shard(str(tmp_path), 0, [record])

    records, rejects = read_shard(str(tmp_path / "00000.parquet"))

    assert rejects == []
    assert records[0]["image"] == buffer.getvalue()
    assert records[0]["image_format"] == "webp"


def test_dedup_command_cut_tar_continues(tmp_path, caplog):
    shards = _small_shards(tmp_path)
    keys, header, size = _cut_tar(shards, ".jpg", 812)
    out = tmp_path / "out"

    assert main(["dedup", str(shards), "-o", str(out), "--runner=FnApiRunner"]) == 0

    kept = pq.read_table(sorted(out.glob("[0-9]*.parquet"))).to_pylist()
    rejects = pq.read_table(sorted((out / "rejects").glob("*.parquet"))).to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    assert [row["key"] for row in kept] == keys[:1]
    assert sorted((row["key"], row["stage"], row["reason"]) for row in rejects) == [
        (keys[1], "ingest", "truncated_shard"), (keys[2], "ingest", "truncated_shard")
    ]
    assert stats["input_rows"] == 3
    assert stats["kept"] == 1
    assert stats["rejected"] == 2
    assert stats["stages"][0] == {"stage": "ingest", "in": 3, "out": 1, "rejected": {"truncated_shard": 2}}
    assert stats["stages"][-1]["out"] == 1
    assert f"is cut off or damaged at byte {header} of {size}" in caplog.text


def test_unconverged_nodes_reads_components_counter():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from bm6b.dedup.components import ConnectedComponents
    from bm6b.dedup.run import unconverged_nodes

    # A 30-node chain needs several large-star/small-star round pairs to become one star.
    chain = [(f"n{index:02d}", f"n{index + 1:02d}") for index in range(29)]
    counts = {}
    for rounds in (1, 8):
        pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
        _ = pipeline | beam.Create(chain) | ConnectedComponents(rounds)
        result = pipeline.run()
        result.wait_until_finish()
        counts[rounds] = unconverged_nodes(result)
    assert counts[1] > 0
    assert counts[8] == 0


def test_curate_reports_unconverged_components(tmp_path, monkeypatch, caplog):
    from bm6b.dedup import run as dedup_run
    from bm6b.pipelines.curate import CurateConfig, run_curate
    from test_download_inputs import FETCH, IMAGES, write_shard_metadata, write_webdataset_shard

    folder = tmp_path / "i2d"
    folder.mkdir()
    write_webdataset_shard(folder / "00000.tar", 2)
    write_shard_metadata(folder / "00000.parquet", [("000000000", "success"), ("000000001", "success")])
    (folder / "00000_stats.json").write_text("{}")
    # The counter itself is checked above; here only its path into the log and stats.json.
    monkeypatch.setattr(dedup_run, "unconverged_nodes", lambda result: 4)

    stats = run_curate(CurateConfig(inputs=[str(folder)], output=str(tmp_path / "out"), fetch=FETCH, image=IMAGES))

    assert stats["unconverged_nodes"] == 4
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["unconverged_nodes"] == 4
    assert "did not converge for 4 node(s)" in caplog.text
