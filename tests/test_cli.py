"""The ``bm6b`` command line: errors a user sees, and curate on a small local job."""

from __future__ import annotations

import json

import pytest

from bm6b.cli import main


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
    assert "curate" in out and "demo" in out


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
