"""The ``bm6b`` command line: the errors a user gets, and curate on a small local job."""

from __future__ import annotations

import json
import logging

import pytest

from bm6b.cli import BEAM_TYPEHINT_LOGGER, main


def test_missing_input_exits_with_message(tmp_path, caplog):
    code = main(["curate", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert f"input manifest not found: {tmp_path / 'nope.csv'}" in caplog.text


def test_existing_output_needs_overwrite(tmp_path, caplog):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n", encoding="utf-8")
    code = main(["curate", str(manifest), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "already contains curate output" in caplog.text
    assert "--overwrite" in caplog.text


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "curate" in out
    assert "demo" in out


def test_curate_same_file_twice_reads_it_once(tmp_path, serve_folder, shared_raw):
    server = serve_folder(shared_raw / "photos-permissive")
    manifest = tmp_path / "m.tsv"
    manifest.write_text(
        "url\tcaption_en\n"
        f"{server.url('skimage_coffee.png')}\tCoffee cup.\n"
        f"{server.url('skimage_chelsea.png')}\tChelsea the cat.\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code = main(["curate", str(manifest), str(manifest), "--output", str(out), "--allow-network", "127.0.0.0/8"])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input_rows"], stats["kept"]) == (2, 2)


def test_curate_blocks_loopback_without_allow_network(tmp_path, serve_folder, shared_raw):
    server = serve_folder(shared_raw / "photos-permissive")
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"url\tcaption_en\n{server.url('skimage_coffee.png')}\tCoffee cup.\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["curate", str(manifest), "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejects_by_reason"] == {"blocked_address": 1}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--samples-per-shard", "0", "must be at least 1"),
        ("--samples-per-shard", "-5", "must be at least 1"),
        ("--timeout", "-1", "must be greater than 0"),
        ("--connect-timeout", "0", "must be greater than 0"),
        ("--deadline", "-1", "must be greater than 0"),
        ("--allow-network", "notacidr", "not a network in CIDR form"),
        ("--downscale-interpolation", "cubic", "invalid choice: 'cubic'"),
        ("--jpeg-quality", "0", "must be 1 to 100"),
        ("--dns-concurrency", "0", "must be at least 1"),
        ("--webp-quality", "101", "must be 1 to 100"),
    ],
)
def test_invalid_option_values_are_usage_errors(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["curate", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_option_is_an_error(tmp_path, caplog):
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n", encoding="utf-8")
    code = main(["curate", str(manifest), "--output", str(tmp_path / "out"), "--min-image-sise", "5000"])
    assert code == 2
    assert "unrecognized arguments: --min-image-sise (neither" in caplog.text
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file(tmp_path, caplog):
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n", encoding="utf-8")
    (tmp_path / "afile").write_text("x")
    assert main(["curate", str(manifest), "--output", str(tmp_path / "afile")]) == 2
    assert "is a file; give a folder" in caplog.text


def test_broken_gzip_midway_becomes_a_reject(tmp_path):
    import gzip

    rows = "".join(f'{{"url": "http://127.0.0.1:9/{i}.jpg", "caption": "photo number {i} of many"}}\n' for i in range(2000))
    data = gzip.compress(rows.encode())
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main(["curate", str(manifest), "--output", str(out), "--retries", "0"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejects_by_reason"]["bad_row"] == 1
    assert stats["input_rows"] == stats["kept"] + stats["rejected"]


def test_train_with_missing_shards_is_one_line_error(tmp_path, caplog):
    code = main(["train", "--shards", str(tmp_path / "nosuch" / "{00000..00003}.tar"), "-o", str(tmp_path / "run"), "--steps", "1"])
    assert code == 2
    assert "not found" in caplog.text
    assert "Traceback" not in caplog.text


def test_eval_with_missing_checkpoint_is_one_line_error(tmp_path, caplog):
    code = main(["eval", "--shards", str(tmp_path / "x.tar"), "--checkpoint", str(tmp_path / "nosuch.pt")])
    assert code == 2
    assert "nosuch.pt" in caplog.text or "x.tar" in caplog.text


@pytest.mark.parametrize("level, expected", [("INFO", logging.WARNING), ("WARNING", logging.WARNING), ("DEBUG", logging.NOTSET)])
def test_beam_typehint_logs_only_at_debug(level, expected, capsys):
    logger = logging.getLogger(BEAM_TYPEHINT_LOGGER)
    logger.setLevel(logging.NOTSET)
    try:
        assert main(["--log-level", level]) == 2  # no command: prints help
        assert logger.level == expected
    finally:
        logger.setLevel(logging.NOTSET)


def test_interpolation_flags_reach_image_config(tmp_path):
    import argparse

    from bm6b.pipelines.cli import add_curate_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_curate_arguments(parser)
    args = parser.parse_args(["--upscale-interpolation", "bicubic"])
    config = config_from_args(args, [str(tmp_path / "m.csv")], str(tmp_path / "out"))
    assert config.image.upscale_interpolation == "bicubic"
    assert config.image.downscale_interpolation == "area"


def test_dns_concurrency_reaches_fetch_config(tmp_path):
    import argparse

    from bm6b.pipelines.cli import add_curate_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_curate_arguments(parser)
    default = config_from_args(parser.parse_args([]), [str(tmp_path / "m.csv")], str(tmp_path / "out"))
    configured = config_from_args(parser.parse_args(["--dns-concurrency", "4"]), [str(tmp_path / "m.csv")], str(tmp_path / "out"))
    assert default.fetch.dns_concurrency == 32
    assert configured.fetch.dns_concurrency == 4
