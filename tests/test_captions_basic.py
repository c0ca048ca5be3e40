"""Caption normalization and language-ID slot assignment on real captions."""

from __future__ import annotations

import copy

from bm6b.filters.captions import (
    assign_languages,
    assign_languages_batch,
    detect_language,
    normalize_caption,
    normalize_record,
)
from text_data import flickr8k_captions, laion_texts


def test_normalize_caption_rules():
    assert normalize_caption("Tom &amp; Jerry&#39;s  house\n") == "Tom & Jerry's house"
    assert normalize_caption("ＡＢＣ　１２３") == "ABC 123"  # NFKC folds full-width forms
    assert normalize_caption("一个女孩，走进木屋。") == "一个女孩，走进木屋。"  # Chinese punctuation stays full-width
    assert normalize_caption("  \t ") is None
    assert normalize_caption(None) is None


def test_record_without_any_caption_is_rejected():
    record = {"caption_zh": " ", "caption_en": None, "captions": ["&nbsp;"]}
    _, failure = normalize_record(record)
    assert failure == ("empty_caption", "no caption left after normalization")


def test_real_flickr8k_captions_detected():
    # Flickr8k-CN: the first photo's English caption #0 and independent Chinese caption #0.
    assert detect_language("A child in a pink dress is climbing up a set of stairs in an entry way .")[0] == "en"
    label, score = detect_language("穿着连衣裙的小女孩。")
    assert label == "zh" and score > 0.9


def test_unknown_language_captions_move_to_slots():
    record = {"caption_zh": None, "caption_en": None, "captions": ["一个小女孩爬进一个木制的剧场。"]}
    record, failure = assign_languages(record)
    assert failure is None
    assert record["caption_zh"] == "一个小女孩爬进一个木制的剧场。"
    assert record["lid_zh"] == "zh"

    record = {"caption_zh": None, "caption_en": None, "captions": ["Ein Hund rennt über die Wiese."]}
    record, failure = assign_languages(record)
    assert failure[0] == "unsupported_language"
    assert failure[1].startswith("detected de:")


def test_explicit_slots_keep_their_caption_and_record_lid():
    record = {"caption_zh": "穿着连衣裙的小女孩。", "caption_en": "A girl going into a wooden building .", "captions": []}
    record, failure = assign_languages(record)
    assert failure is None
    assert (record["lid_zh"], record["lid_en"]) == ("zh", "en")
    assert record["lid_en_score"] > 0.5


def test_batch_same_as_single_records():
    english = flickr8k_captions("enc")
    chinese = flickr8k_captions("zhc")
    keys = list(english)[:300]
    records = [{"caption_zh": chinese.get(key), "caption_en": english[key], "captions": []} for key in keys]
    records += [{"caption_zh": None, "caption_en": None, "captions": [text]} for text in laion_texts()[:300]]
    normalized = [record for record, failure in map(normalize_record, records) if failure is None]

    single = [assign_languages(copy.deepcopy(record)) for record in normalized]
    batched = assign_languages_batch(copy.deepcopy(normalized))
    assert len(batched) == len(single)
    for single_result, batch_result in zip(single, batched):
        assert batch_result == single_result
    assert sum(failure is not None for _, failure in single) > 0
