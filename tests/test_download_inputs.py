"""Curate inputs owned by the download stage: --retry-failed and img2dataset output folders."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bm6b.filters.download import FetchConfig
from bm6b.filters.image import ImageConfig
from bm6b.pipelines.curate import CurateConfig, run_curate
from bm6b.pipelines.img2dataset_input import iter_shard, reason_from_error
from bm6b.pipelines.retry_failed import record_from_reject
from tests.download_servers import HostileServer, make_noise_jpeg

CAPTIONS = [
    ("A brown dog runs across the green grass.", "一只棕色的狗在绿色的草地上奔跑。"),
    ("Two children play football on a sunny beach.", "两个孩子在阳光明媚的海滩上踢足球。"),
    ("A man rides a red bicycle down a busy street.", "一个男人骑着红色自行车穿过繁忙的街道。"),
    ("A woman reads a book under a large tree.", "一个女人在一棵大树下看书。"),
    ("A black cat sleeps on a wooden chair.", "一只黑猫睡在木椅上。"),
    ("Three boats float on a calm blue lake.", "三艘小船漂浮在平静的蓝色湖面上。"),
]
FETCH = FetchConfig(allow_networks=("127.0.0.0/8",), retries=0, deadline=10.0, breaker_failures=0)
IMAGES = ImageConfig(image_size=64, resize_mode="center_crop")


def read_rows(folder) -> tuple[list[dict], list[dict]]:
    kept_files = sorted(folder.glob("[0-9]*.parquet"))
    kept = pq.read_table(kept_files).to_pylist() if kept_files else []
    rejects = pq.read_table(sorted((folder / "rejects").glob("*.parquet"))).to_pylist()
    return kept, rejects


@pytest.fixture
def server():
    images = {f"p{i}.jpg": make_noise_jpeg(i) for i in range(len(CAPTIONS))}
    with HostileServer(images) as hostile:
        yield hostile


def write_manifest(path, urls: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption_en", "caption_zh"])
        for url, (en, zh) in zip(urls, CAPTIONS):
            writer.writerow([url, en, zh])


def test_retry_failed_reruns_only_retryable(server, tmp_path):
    server.fail_first = {"p2.jpg": 1, "p3.jpg": 1}
    urls = [server.url("/img/p0.jpg"), server.url("/img/p1.jpg"), server.url("/flaky/p2.jpg"),
            server.url("/flaky/p3.jpg"), server.url("/404"), server.url("/html-as-jpeg")]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, urls)

    first = run_curate(CurateConfig(inputs=[str(manifest)], output=str(tmp_path / "run1"), fetch=FETCH, image=IMAGES))
    kept1, rejects1 = read_rows(tmp_path / "run1")
    second = run_curate(CurateConfig(inputs=[], output=str(tmp_path / "run2"), fetch=FETCH, image=IMAGES,
                                     retry_failed=str(tmp_path / "run1")))
    kept2, rejects2 = read_rows(tmp_path / "run2")

    reasons1 = {r["url"]: r["reason"] for r in rejects1}
    assert reasons1 == {urls[2]: "http_5xx", urls[3]: "http_5xx", urls[4]: "http_404", urls[5]: "not_an_image"}
    assert {r["url"] for r in kept1} == set(urls[:2])
    assert first["kept"] == 2
    assert second["input_rows"] == 2
    assert {r["url"] for r in kept2} == {urls[2], urls[3]}
    assert rejects2 == []
    keys1 = {r["url"]: r["key"] for r in rejects1}
    assert {r["url"]: r["key"] for r in kept2} == {u: keys1[u] for u in urls[2:4]}
    assert {r["url"]: r["caption_en"] for r in kept2} == {urls[2]: CAPTIONS[2][0], urls[3]: CAPTIONS[3][0]}
    assert server.requests["/404"] == 1  # not retryable: never asked again
    assert server.requests["/html-as-jpeg"] == 1
    assert server.requests["/flaky/p2.jpg"] == 2


def test_retry_failed_same_folder_rejected(tmp_path):
    (tmp_path / "run1" / "rejects").mkdir(parents=True)
    with pytest.raises(ValueError, match="same folder"):
        run_curate(CurateConfig(inputs=[], output=str(tmp_path / "run1"), retry_failed=str(tmp_path / "run1")))


def test_retry_failed_missing_rejects(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rejects"):
        run_curate(CurateConfig(inputs=[], output=str(tmp_path / "new"), fetch=FETCH, retry_failed=str(tmp_path / "none")))


def run_img2dataset(urls: list[str], captions: list[str], folder, output_format: str, work) -> None:
    """Download with img2dataset 1.47's own Downloader, Resizer and writers, in this process.

    ``img2dataset.download`` does the same through a spawned process pool, whose start-up (about
    30 s of imports per process on a loaded 2-core machine) would dominate the test.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    shard_file = work / "shard.feather"
    table = pa.table({"url": urls, "caption": captions})
    with pa.OSFile(str(shard_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    folder.mkdir()
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter if output_format == "webdataset" else ParquetSampleWriter,
        resizer=Resizer(image_size=64, resize_mode="border", resize_only_if_bigger=False),
        thread_count=4,
        save_caption=True,
        extract_exif=True,
        output_folder=str(folder),
        column_list=["url", "caption"],
        timeout=5,
        number_sample_per_shard=100,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    downloader((0, str(shard_file)))


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_img2dataset_folder_as_input(server, tmp_path, output_format):
    urls = [server.url(f"/img/p{i}.jpg") for i in range(4)] + [server.url("/404")]
    captions = [en for en, _ in CAPTIONS[:5]]
    folder = tmp_path / "i2d"
    run_img2dataset(urls, captions, folder, output_format, tmp_path)

    stats = run_curate(CurateConfig(inputs=[str(folder)], output=str(tmp_path / "out"), fetch=FETCH, image=IMAGES))
    kept, rejects = read_rows(tmp_path / "out")

    assert server.requests["/img/p0.jpg"] == 1  # fetched by img2dataset only, never again by bm6b
    assert stats["input_rows"] == 5
    assert sorted(r["url"] for r in kept) == sorted(urls[:4])
    assert all((r["width"], r["height"]) == (64, 64) for r in kept)
    assert {r["url"]: r["caption_en"] for r in kept} == dict(zip(urls[:4], captions))
    assert [(r["url"], r["reason"], r["stage"]) for r in rejects] == [(urls[4], "http_404", "download")]
    assert json.loads(rejects[0]["input"])["url"] == urls[4]


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_5xx"),
        ("HTTP Error 429: Too Many Requests", "http_429"),
        ("HTTP Error 403: Forbidden", "http_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connect"),
        ("image decoding error", "decode_error"),
    ],
)
def test_img2dataset_error_mapping(message, reason):
    assert reason_from_error(message) == reason


def test_img2dataset_broken_json_keeps_sample(tmp_path):
    # A damaged KEY.json loses the sample's URL, not the sample, and must not stop the shard.
    images = [make_noise_jpeg(i) for i in range(3)]
    metadata = [json.dumps({"url": "http://images.test/0.jpg"}).encode(), b"{not json", json.dumps({"url": "http://images.test/2.jpg"}).encode()]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for index, (image, meta) in enumerate(zip(images, metadata)):
            for extension, data in (("jpg", image), ("txt", f"caption {index}".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{index:09d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    outcomes = list(iter_shard(str(shard)))

    assert [kind for kind, _ in outcomes] == ["record"] * 3
    assert [record["url"] for _, record in outcomes] == ["http://images.test/0.jpg", None, "http://images.test/2.jpg"]
    assert [record["image"] for _, record in outcomes] == images
    assert [record["captions"] for _, record in outcomes] == [["caption 0"], ["caption 1"], ["caption 2"]]


def write_webdataset_shard(path, count: int) -> dict[str, dict[str, int]]:
    """Write ``count`` samples the way img2dataset 1.47 does (KEY.jpg, KEY.json, KEY.txt per sample).

    Returns each member's header and data offsets by name, for cutting the file at chosen bytes.
    """
    with tarfile.open(path, "w") as tar:
        for index in range(count):
            key = f"{index:09d}"
            meta = json.dumps({"url": f"http://images.test/{index}.jpg", "key": key}).encode()
            for extension, data in (("jpg", make_noise_jpeg(index)), ("json", meta), ("txt", f"caption {index}".encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: {"header": m.offset, "data": m.offset_data} for m in tar.getmembers()}


def write_shard_metadata(path, rows: list[tuple[str, str]]) -> None:
    """Write the metadata parquet img2dataset puts next to a tar: one (key, status) row per input row."""
    table = pa.table({
        "url": [f"http://images.test/{int(key)}.jpg" for key, _ in rows],
        "caption": [f"caption {int(key)}" for key, _ in rows],
        "key": [key for key, _ in rows],
        "status": [status for _, status in rows],
        "error_message": [None if status == "success" else "HTTP Error 404: Not Found" for _, status in rows],
    })
    pq.write_table(table, path)


# Where the tar of three samples is cut: (member, field, bytes past it), or None to keep it whole.
CUTS = {
    "intact": None,
    "image_data": ("000000001.jpg", "data", 100),  # inside sample 1's image bytes
    "header_with_name": ("000000001.json", "header", 200),  # the NUL-terminated name is in the first 100 bytes
    "header_without_name": ("000000001.json", "header", 5),  # only "00000" of the name
    "empty": ("000000000.jpg", "header", 0),  # a 0-byte file, which tarfile rejects as empty
}


@pytest.mark.parametrize(
    "cut, kept_keys, truncated_keys",
    [
        ("intact", ["000000000", "000000001", "000000002"], []),
        ("image_data", ["000000000"], ["000000001"]),
        ("header_with_name", ["000000000"], ["000000001"]),
        ("header_without_name", ["000000000", "000000001"], []),
        ("empty", [], []),
    ],
)
def test_truncated_tar_without_metadata(tmp_path, caplog, cut, kept_keys, truncated_keys):
    shard = tmp_path / "00000.tar"
    offsets = write_webdataset_shard(shard, 3)
    if CUTS[cut] is not None:
        member, field, extra = CUTS[cut]
        cut_at = offsets[member][field] + extra
        os.truncate(shard, cut_at)

    with caplog.at_level("WARNING", logger="bm6b.pipelines.img2dataset_input"):
        outcomes = list(iter_shard(str(shard)))

    records = [value for kind, value in outcomes if kind == "record"]
    rejects = [value for kind, value in outcomes if kind == "reject"]
    assert [r["image"] for r in records] == [make_noise_jpeg(int(key)) for key in kept_keys]
    assert [(r["reason"], r["detail"].split(":")[0]) for r in rejects] == [("truncated_shard", f"sample {k}") for k in truncated_keys]
    if CUTS[cut] is None:
        assert caplog.records == []
    else:
        header = offsets[CUTS[cut][0]]["header"]
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert str(shard) in message
        assert f"at byte {header} of {cut_at}" in message


@pytest.mark.parametrize(
    "cut, kept_keys, truncated_keys",
    [
        ("intact", ["000000000", "000000001", "000000002"], []),
        ("image_data", ["000000000"], ["000000001", "000000002"]),
        ("header_with_name", ["000000000"], ["000000001", "000000002"]),
        ("header_without_name", ["000000000", "000000001"], ["000000002"]),
        ("empty", [], ["000000000", "000000001", "000000002"]),
    ],
)
def test_truncated_tar_with_metadata(tmp_path, cut, kept_keys, truncated_keys):
    # The parquet lists every sample: the three in the tar and a failed fourth. Each key must end
    # in exactly one record or one reject, with the URL the parquet gives it.
    shard = tmp_path / "00000.tar"
    offsets = write_webdataset_shard(shard, 3)
    write_shard_metadata(tmp_path / "00000.parquet", [("000000000", "success"), ("000000001", "success"),
                                                     ("000000002", "success"), ("000000003", "failed_to_download")])
    if CUTS[cut] is not None:
        member, field, extra = CUTS[cut]
        os.truncate(shard, offsets[member][field] + extra)

    outcomes = list(iter_shard(str(shard)))

    url = "http://images.test/{}.jpg".format
    records = [value for kind, value in outcomes if kind == "record"]
    rejects = [value for kind, value in outcomes if kind == "reject"]
    assert [r["url"] for r in records] == [url(int(key)) for key in kept_keys]
    assert [r["captions"] for r in records] == [[f"caption {int(key)}"] for key in kept_keys]
    expected_rejects = [(url(int(key)), "truncated_shard") for key in truncated_keys] + [(url(3), "http_404")]
    assert sorted((r["url"], r["reason"]) for r in rejects) == sorted(expected_rejects)
    assert len({r["key"] for r in records + rejects}) == len(outcomes)  # every outcome has its own key
    for reject in rejects:
        if reject["reason"] == "truncated_shard":
            kind, retried = record_from_reject(reject, columns=None)  # what --retry-failed fetches again
            assert (kind, retried["url"], retried["captions"]) == ("record", reject["url"], [f"caption {reject['url'][-5]}"])


def test_truncated_shard_through_curate(tmp_path):
    # A cut tar in an img2dataset folder must not stop the job, and each of its rows must end in
    # the output shards or the rejects table.
    folder = tmp_path / "i2d"
    folder.mkdir()
    offsets = write_webdataset_shard(folder / "00000.tar", 3)
    write_shard_metadata(folder / "00000.parquet", [("000000000", "success"), ("000000001", "success"),
                                                   ("000000002", "success"), ("000000003", "failed_to_download")])
    (folder / "00000_stats.json").write_text("{}")
    os.truncate(folder / "00000.tar", offsets["000000001.jpg"]["data"] + 100)

    stats = run_curate(CurateConfig(inputs=[str(folder)], output=str(tmp_path / "out"), fetch=FETCH, image=IMAGES))
    kept, rejects = read_rows(tmp_path / "out")

    assert stats["input_rows"] == 4
    assert [r["url"] for r in kept] == ["http://images.test/0.jpg"]
    assert sorted((r["url"], r["reason"]) for r in rejects) == [
        ("http://images.test/1.jpg", "truncated_shard"),
        ("http://images.test/2.jpg", "truncated_shard"),
        ("http://images.test/3.jpg", "http_404"),
    ]


def test_img2dataset_json_odd_caption_values(tmp_path):
    # KEY.json is parsed JSON: "\ud800" escapes decode to lone surrogates, which UTF-8 cannot
    # encode, and a caption or URL may be a number. Each sample must still become a record.
    metas = [
        '{"url": "http://images.test/0.jpg", "caption": "a brown dog \\ud800 runs on the grass"}',
        '{"url": "http://images.test/1.jpg", "caption": 123}',
        '{"url": 7, "caption": "\\udc80\\udc81"}',
    ]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for index, meta in enumerate(metas):
            for extension, data in (("jpg", make_noise_jpeg(index)), ("json", meta.encode())):
                info = tarfile.TarInfo(f"{index:09d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    outcomes = list(iter_shard(str(shard)))

    records = [value for kind, value in outcomes if kind == "record"]
    assert len(records) == 3
    assert records[0]["captions"] == ["a brown dog \ufffd runs on the grass"]
    assert records[1]["captions"] == ["123"]
    assert records[2]["url"] == "7"
    assert records[2]["captions"] == ["\ufffd\ufffd"]
    for record in records:
        record["input"].encode("utf-8")
