"""Caption stages on records: per-record functions, CLI options, and the Beam transforms."""

from __future__ import annotations

import argparse

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from bm6b.filters import captions
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.translate import TranslateChecker
from bm6b.pipelines.caption_stages import apply_caption_stages, caption_stages_run
from text_data import flickr8k_captions


def record(key: str, zh: str | None = None, en: str | None = None, untyped: list[str] | None = None) -> dict:
    return {"key": key, "uid": key, "url": f"http://127.0.0.1/{key}.jpg", "source": "m.tsv", "source_row": 0,
            "caption_zh": zh, "caption_en": en, "captions": untyped or []}


def caption_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    captions.add_caption_arguments(parser)
    return parser


def test_url_caption_filtered_with_rule():
    rec, failure = captions.assign_languages(record("a", en="http://www.example.com/photo/123"))
    assert failure == ("caption_filtered", "en: url: the caption is a URL")


def test_boilerplate_stripped_before_lid():
    rec, failure = captions.assign_languages(record("a", untyped=["Christmas Seamless Background — 图库矢量图片"]))
    assert failure is None
    assert rec["caption_en"] == "Christmas Seamless Background"
    assert rec["caption_zh"] is None


def test_short_zh_dropped_en_kept():
    rec, failure = captions.assign_languages(record("a", zh="小狗。", en="A small dog on the grass ."))
    assert failure is None
    assert rec["caption_zh"] is None
    assert rec["caption_en"] == "A small dog on the grass ."
    assert rec["caption_issues"] == ["zh: too_short: 2 Chinese characters and words < 4"]


def test_column_caption_in_wrong_language():
    rec, failure = captions.assign_languages(record("a", en="一只狗在草地上奔跑"))
    assert failure is None
    assert rec["caption_zh"] == "一只狗在草地上奔跑"
    assert rec["caption_en"] is None


def test_low_confidence_column_caption_kept():
    # lid.176 lite gives this real Flickr8k caption en 0.21, below the 0.25 minimum for untyped captions.
    rec, failure = captions.assign_languages(record("a", en="A black dog ."))
    assert failure is None
    assert rec["caption_en"] == "A black dog ."
    assert rec["lid_en"] == "en"
    rec, failure = captions.assign_languages(record("b", untyped=["A black dog ."]))
    assert failure[0] == "unsupported_language"


def test_traditional_converted_original_kept():
    config = CaptionConfig(convert_traditional=True)
    rec, failure = captions.assign_languages(record("a", zh="一隻狗在草地上奔跑"), config=config)
    assert failure is None
    assert rec["caption_zh"] == "一只狗在草地上奔跑"
    assert rec["caption_zh_original"] == "一隻狗在草地上奔跑"
    assert rec["zh_script"] == "traditional"


def test_check_translation_flickr8k():
    english = flickr8k_captions("enc")
    human = flickr8k_captions("zhm")
    independent = flickr8k_captions("zhc")
    key = "1056338697_4f7d7ce270.jpg#0"
    checker = TranslateChecker(CaptionConfig())

    rec, failure = captions.check_translation(record("a", zh=human[key], en=english[key]), checker)
    assert failure is None
    assert rec["translate_score"] >= 0.5

    rec, failure = captions.check_translation(record("b", zh=independent[key], en=english[key]), checker)
    assert failure[0] == "translation_mismatch"
    assert "en_coverage=" in failure[1]

    rec, failure = captions.check_translation(record("c", en=english[key]), checker)
    assert failure is None
    assert rec["translate_score"] is None


def test_drop_frequent_captions():
    rec, failure = captions.drop_frequent_captions(
        record("a", zh="查看源网页的图片", en="A dog on the grass ."), {"zh\0查看源网页的图片": 12}, 10)
    assert failure is None
    assert rec["caption_zh"] is None
    assert rec["caption_en"] == "A dog on the grass ."
    rec, failure = captions.drop_frequent_captions(record("b", en="Patent Drawing"), {"en\0patent drawing": 11}, 10)
    assert failure == ("caption_filtered", "en: caption seen 11 times > 10")


def test_caption_arguments_build_config(tmp_path):
    blocklist = tmp_path / "zh.txt"
    blocklist.write_text("禁词\n", encoding="utf-8")
    parser = caption_parser()
    args = parser.parse_args([
        "--min-zh-chars", "6", "--min-lid-confidence", "en=0.4", "--min-lid-confidence", "yue=0.9",
        "--caption-blocklist", f"zh={blocklist}", "--translate-check", "--translate-threshold", "0.7",
        "--max-caption-repeats", "3", "--convert-traditional",
    ])
    config = captions.caption_config_from_args(args)
    assert config.min_zh_chars == 6
    assert config.min_lid_confidence == {"zh": 0.5, "en": 0.4, "yue": 0.9}
    assert config.blocklist_files["zh"] == (str(blocklist),)
    assert config.blocklist_files["en"] == CaptionConfig().blocklist_files["en"]
    assert config.translate_check
    assert config.translate_threshold == 0.7
    assert config.max_caption_repeats == 3
    assert config.convert_traditional


def test_caption_arguments_missing_blocklist(tmp_path):
    parser = caption_parser()
    args = parser.parse_args(["--caption-blocklist", f"en={tmp_path / 'absent.txt'}"])
    with pytest.raises(ValueError, match="absent.txt"):
        captions.caption_config_from_args(args)


def test_caption_arguments_invalid_pair():
    parser = caption_parser()
    args = parser.parse_args(["--min-lid-confidence", "en"])
    with pytest.raises(ValueError, match="LANG=VALUE"):
        captions.caption_config_from_args(args)


def test_lone_surrogate_caption_gets_language_id():
    # A record that skipped normalization must not crash fastText, which takes only encodable text.
    rec, failure = captions.assign_languages(record("s", en="a brown dog \ud800 runs on the grass"))
    assert failure is None
    assert rec["lid_en"] == "en"


def test_caption_arguments_lid_confidence_range():
    parser = caption_parser()
    for value in ("nan", "inf", "-0.1", "1.5"):
        args = parser.parse_args(["--min-lid-confidence", f"zh={value}"])
        with pytest.raises(ValueError, match="between 0 and 1"):
            captions.caption_config_from_args(args)


def test_caption_arguments_lid_label_case_and_spaces():
    parser = caption_parser()
    args = parser.parse_args(["--min-lid-confidence", " ZH = 0.7", "--min-lid-confidence", "en=1"])
    config = captions.caption_config_from_args(args)
    assert config.min_lid_confidence == {"zh": 0.7, "en": 1.0}


def test_caption_arguments_binary_list_file(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok\n\xff\xfe\xfa\x00")
    parser = caption_parser()
    for option, value in (("--caption-blocklist", f"en={binary}"), ("--boilerplate-file", str(binary))):
        args = parser.parse_args([option, value])
        with pytest.raises(ValueError, match="binary.txt.*UTF-8"):
            captions.caption_config_from_args(args)


def test_beam_caption_stages():
    english = flickr8k_captions("enc")
    human = flickr8k_captions("zhm")
    independent = flickr8k_captions("zhc")
    key = "1056338697_4f7d7ce270.jpg#0"
    rows = [record("good", zh=human[key], en=english[key]),
            record("mismatch", zh=independent[key], en=english[key]),
            record("german", untyped=["Ein Hund rennt über die Wiese."]),
            record("empty", en="  \u200b "),
            record("filename", en="IMG_2041.JPG")]
    # "Patent Drawing" occurs in 4 rows, above the limit of 3.
    rows += [record(f"patent{i}", en="Patent Drawing") for i in range(4)]
    rows.append(record("patent_zh", zh="一张专利图纸的扫描件", en="Patent Drawing"))
    config = CaptionConfig(translate_check=True, max_caption_repeats=3)

    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        kept, rejects = apply_caption_stages(pipeline | beam.Create(rows), config)
        assert_that(kept | "KeptKeys" >> beam.Map(lambda r: (r["key"], r["caption_zh"], r["caption_en"])),
                    equal_to([("good", human[key], english[key]), ("patent_zh", "一张专利图纸的扫描件", None)]),
                    label="Kept")
        all_rejects = rejects | beam.Flatten()
        assert_that(all_rejects | beam.Map(lambda r: (r["key"], r["stage"], r["reason"])), equal_to([
            ("mismatch", "translate", "translation_mismatch"),
            ("german", "lid", "unsupported_language"),
            ("empty", "captions", "empty_caption"),
            ("filename", "lid", "caption_filtered"),
            *[(f"patent{i}", "caption_frequency", "caption_filtered") for i in range(4)],
        ]), label="Rejects")

    assert caption_stages_run(config) == ["captions", "lid", "caption_frequency", "translate"]


@pytest.mark.parametrize("option, value", [
    ("--max-special-char-ratio", "nan"),
    ("--max-special-char-ratio", "-0.5"),
    ("--max-special-char-ratio", "1.5"),
    ("--translate-threshold", "nan"),
    ("--translate-threshold", "2"),
    ("--max-caption-repeats", "-1"),
    ("--min-zh-chars", "-1"),
    ("--min-en-words", "-2"),
    ("--max-en-words", "-1"),
])
def test_caption_arguments_out_of_range(option, value):
    parser = caption_parser()
    args = parser.parse_args([option, value])
    with pytest.raises(ValueError, match=f"invalid {option} {value}"):
        captions.caption_config_from_args(args)


def test_caption_arguments_min_above_max():
    parser = caption_parser()
    args = parser.parse_args(["--min-zh-chars", "10", "--max-zh-chars", "5"])
    with pytest.raises(ValueError, match="--min-zh-chars 10 is above --max-zh-chars 5"):
        captions.caption_config_from_args(args)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"zh_labels": ()}, "zh_labels is empty"),
        ({"length_ratio_low": 0.0}, "invalid length_ratio_low 0.0"),
        ({"length_ratio_low": 0.5}, "invalid length_ratio_low 0.5"),
        ({"length_ratio_high": 2.0}, "invalid length_ratio_high 2.0"),
    ],
)
def test_caption_config_rejects_bounds(changes, message):
    with pytest.raises(ValueError, match=message):
        CaptionConfig().replace(**changes)


def test_emptied_zh_labels_raise_not_crash():
    # Set after construction, so the config check does not see it; the compiled rules read the first label.
    config = CaptionConfig()
    config.zh_labels = ()
    with pytest.raises((ValueError, IndexError)):
        captions.detect_language("a dog runs on the grass", None, config)
