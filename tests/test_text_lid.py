"""Language ID slotting and Chinese script detection with the real lid.176 lite model."""

from __future__ import annotations

import pytest

from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.lid import (
    BOTH,
    MIXED,
    NO_HAN,
    SIMPLIFIED,
    TRADITIONAL,
    chinese_script,
    identify,
    normalize_script,
    predict_labels,
    script_shares,
)
from bm6b.filters.text_normalize import normalize_caption
from text_data import coco_captions, flickr8k_captions, laion_texts, multi30k_captions

CONFIG = CaptionConfig()


def slot_of(text: str, config: CaptionConfig = CONFIG) -> str | None:
    return identify(normalize_caption(text), config).slot


def test_english_caption():
    result = identify("A child in a pink dress is climbing up a set of stairs in an entry way .", CONFIG)
    assert result.slot == "en"
    assert result.label == "en"
    assert result.score > 0.9
    assert not result.mixed


def test_all_caps_english():
    text = "A MAN IS SKIING ON THE SNOW SLOPES"
    assert max(predict_labels(text.lower()), key=predict_labels(text.lower()).get) == "en"
    assert slot_of(text) == "en"


def test_han_text_labelled_other_by_model():
    # The lite model's top label for this Chinese caption is Italian.
    probs = predict_labels("围着围裙的女人。")
    assert max(probs, key=probs.get) == "it"
    result = identify("围着围裙的女人。", CONFIG)
    assert result.slot == "zh"
    assert result.label == "zh"
    assert result.score == pytest.approx(0.5)


def test_no_han_means_not_chinese():
    probs = predict_labels("33 Vertical Slurry Pump")
    assert max(probs, key=probs.get) == "zh"
    result = identify("33 Vertical Slurry Pump", CONFIG)
    assert result.slot is None or result.slot == "en"
    assert result.label != "zh"


def test_cantonese_and_wu_keep_label():
    cantonese = identify("我哋一齊去睇戲啦", CONFIG)
    assert cantonese.slot == "zh"
    assert cantonese.label == "yue"
    assert cantonese.score > 0.99
    wu = identify("阿拉上海人欢喜吃大闸蟹", CONFIG)
    assert wu.slot == "zh"
    assert wu.label == "wuu"


def test_variant_minimum_confidence():
    config = CaptionConfig(min_lid_confidence={"zh": 0.5, "en": 0.25, "wuu": 0.99}, han_script_override=1.1)
    assert identify("阿拉上海人欢喜吃大闸蟹", config).slot is None


def test_japanese_with_kana_not_chinese():
    laion = laion_texts()
    result = identify(normalize_caption(laion[768]), CONFIG)
    assert laion[768] == "CHIMERA GAMESのアーカイブ画像:Vol.7FMX NIGHT SESSION"
    assert result.slot is None
    assert result.label == "ja"


def test_mixed_han_and_latin_laion():
    laion = laion_texts()
    assert laion[2003] == "金马伦景点 The Boh Tea Plantation"
    result = identify(laion[2003], CONFIG)
    assert result.slot == "zh"
    assert result.mixed
    assert script_shares(laion[2003]) == pytest.approx((5 / 9, 4 / 9, False))


def test_cyrillic_not_slotted():
    laion = laion_texts()
    assert laion[1168] == "Кроссовки Nike Dunk Retro QS"
    result = identify(laion[1168], CONFIG)
    assert result.slot is None
    assert result.label == "ru"


def test_min_confidence_per_language():
    text = "A horse stands tethered to a wall."
    assert identify(text, CONFIG).score == pytest.approx(0.168, abs=0.005)
    assert identify(text, CONFIG).slot is None
    lenient = CaptionConfig(min_lid_confidence={"zh": 0.5, "en": 0.15})
    assert identify(text, lenient).slot == "en"


def test_accuracy_coco_english():
    captions = coco_captions(limit=5000)
    slots = [slot_of(c) for c in captions]
    assert slots.count("en") / len(captions) >= 0.995


def test_accuracy_flickr8k_chinese():
    for kind in ("zhc", "zhm"):
        captions = list(flickr8k_captions(kind).values())[:5000]
        slots = [slot_of(c) for c in captions]
        assert slots.count("zh") / len(captions) >= 0.999, kind


def test_multi30k_languages_are_other():
    for language in ("de", "fr", "cs"):
        captions = multi30k_captions(language)
        slots = [slot_of(c) for c in captions]
        assert slots.count(None) / len(captions) >= 0.995, language
        assert slots.count("zh") == 0, language


def test_chinese_script_classes():
    assert chinese_script("一隻狗在草地上奔跑") == TRADITIONAL
    assert chinese_script("一个穿着泳装的女人躺在海水里。") == SIMPLIFIED
    assert chinese_script("人在水里") == BOTH
    assert chinese_script("一隻狗和一个人") == MIXED
    assert chinese_script("a dog") == NO_HAN


def test_traditional_conversion_keeps_original():
    config = CaptionConfig(convert_traditional=True)
    text, script, original = normalize_script("一隻狗在草地上奔跑", config)
    assert text == "一只狗在草地上奔跑"
    assert script == TRADITIONAL
    assert original == "一隻狗在草地上奔跑"


def test_traditional_conversion_lone_surrogate():
    # A caption that skipped normalization: OpenCC cannot encode the surrogate as UTF-8.
    config = CaptionConfig(convert_traditional=True)
    text, script, original = normalize_script("一隻狗\ud800在跑", config)
    assert text == "一只狗\ufffd在跑"
    assert script == TRADITIONAL
    assert original == "一隻狗\ud800在跑"


def test_conversion_off_by_default():
    text, script, original = normalize_script("一隻狗在草地上奔跑", CONFIG)
    assert text == "一隻狗在草地上奔跑"
    assert script == TRADITIONAL
    assert original is None


def test_simplified_not_converted():
    config = CaptionConfig(convert_traditional=True)
    assert normalize_script("一个人在水里", config) == ("一个人在水里", SIMPLIFIED, None)
