"""Translate-check scorer: sub-scores on hand-checked pairs and the Flickr8k-CN harness on a subset."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import zlib

import pytest

from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.text_normalize import HAN_CLASS
from bm6b.filters.translate import (
    TranslateChecker,
    _uncovered_content_runs,
    agreement,
    alternatives,
    content_stems,
    default_index,
    en_colours,
    en_counts,
    length_score,
    stem,
    token_score,
    zh_colours,
    zh_counts,
)
from text_data import raw_path

CONFIG = CaptionConfig()
BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "translate_check.py"


@pytest.fixture(scope="module", params=["compiled", "python"])
def checker(request):
    """The checker as a run builds it, and one held to the pure-Python reference scorer."""
    checker = TranslateChecker(CONFIG)
    if request.param == "python":
        checker._fast = None
    elif checker._fast is None:
        pytest.skip("bm6b.filters._translate_fast is not built or BM6B_PURE_PYTHON is set")
    return checker


def load_harness():
    spec = importlib.util.spec_from_file_location("translate_check_harness", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stem_rules():
    assert stem("dogs") == "dog"
    assert stem("running") == "run"
    assert stem("swimming") == "swim"
    assert stem("puppies") == "puppy"
    assert stem("boxes") == "box"
    assert stem("glasses") == "glass"
    assert stem("men") == "man"


def test_alternatives_strip_suffixes():
    assert "snow" in alternatives("snowy")
    assert "ski" in alternatives("skier")
    assert "play" in alternatives("playfully")
    assert "small" in alternatives("little")


def test_content_stems_drop_function_words():
    assert content_stems("The dogs are in the snow in front of a fence .") == ["dog", "snow", "fence"]


def test_cedict_glosses():
    index = default_index()
    assert "dog" in index.glosses["狗"]
    assert "snow" in index.glosses["雪"]
    assert index.glosses["漢字"] == index.glosses["汉字"]
    assert len(index.glosses) > 100_000


def test_length_score_bands():
    assert length_score("一二三四五六七八九十", 5, CONFIG) == (1.0, pytest.approx(10 / 8))
    score, ratio = length_score("一二", 10, CONFIG)
    assert ratio == pytest.approx(2 / 16)
    assert score == 0.0
    # Ratio 0.3: log-linear between 0.5 (score 1) and 0.25 (score 0).
    score, ratio = length_score("一二三四五六", 12.5, CONFIG)
    assert ratio == pytest.approx(0.3)
    assert score == pytest.approx(1 - (math.log(0.3) - math.log(0.5)) / (math.log(0.25) - math.log(0.5)))


def test_token_score_cases():
    assert token_score("iPhone 13 手机壳", "an iPhone 13 phone case") == 1.0
    assert token_score("iPhone 13 手机壳", "a Samsung 12 phone case") == 0.0
    assert token_score("两只狗", "2 dogs") == 1.0
    assert token_score("3只狗", "three dogs") == 1.0
    assert token_score("一只狗", "a dog") is None


def test_colours_and_counts():
    assert zh_colours("一只黑色的狗跳过红色的栅栏") == {"black", "red"}
    assert en_colours(["a", "black", "dog"]) == {"black"}
    assert en_colours(["a", "blond", "tan", "dog"]) == {"gold", "brown"}
    assert zh_counts("两只狗和3只猫") == {2, 3}
    assert zh_counts("一只狗") == set()
    assert en_counts(["three", "dogs"]) == {3}
    assert agreement({"black", "red"}, {"black"}) == 0.5
    assert agreement({2}, {3}) == 0.0
    assert agreement(set(), set()) is None


def test_uncovered_content_runs():
    zh = "一只黑色的狗跳过红色的栅栏"
    # 黑色 (positions 2-3) and 狗 (5) are covered. 一, 只 and 的 are function characters.
    assert _uncovered_content_runs(zh, {2, 3, 5}) == ["跳过红色", "栅栏"]
    assert _uncovered_content_runs(zh, set()) == ["黑色", "狗跳过红色", "栅栏"]
    assert _uncovered_content_runs("A dog", set()) == []


def test_words_in_finds_long_words():
    index = default_index()
    words = index.words_in("一个男孩在游泳池里游泳。")
    # 游泳池 (swimming pool) overlaps 游泳 and 泳池; every overlapping dictionary word is returned.
    assert {"游泳池", "游泳", "泳池", "池", "男孩"} <= words
    assert "一个男孩" not in words
    # A six-character entry, the longest kept, at the end of a run and after a shorter run.
    assert "风湿性关节炎" in index.words_in("他说：有风湿性关节炎")
    assert index.words_in("A dog") == set()


def brute_force_words(index, zh):
    """Every substring of at most ``max_chars`` characters of each Han run that is a dictionary key."""
    found = set()
    for run in re.findall(f"[{HAN_CLASS}]+", zh):
        for start in range(len(run)):
            for end in range(start + 1, min(len(run), start + index.max_chars) + 1):
                if run[start:end] in index.glosses:
                    found.add(run[start:end])
    return found


def test_words_in_matches_brute_force():
    index = default_index()
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    captions = [zh for zh, _ in harness.build_pairs(raw, "test", limit=40)["human"]]
    captions += ["越野摩托车手", "他说：有风湿性关节炎", "漢字和汉字", "狗", ""]
    for zh in captions:
        assert index.words_in(zh) == brute_force_words(index, zh), zh


def test_match_keys_add_prefixes():
    index = default_index()
    keys = index.match_keys("自行车")
    assert index.glosses["自行车"] <= keys
    assert "bicyc" in keys
    assert index.match_keys("自行车") is keys


def test_image_half_splits_test_images():
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    images = harness.read_split(raw, "test")
    fit = [image for image in images if harness.image_half(image) == "fit"]
    held_out = [image for image in images if harness.image_half(image) == "held-out"]
    assert len(fit) + len(held_out) == 1000
    # The halves come from the CRC-32 parity of the image id, so they are close to even.
    assert 450 <= len(fit) <= 550
    pairs = harness.build_pairs(raw, "test", half="held-out", limit=3)
    kept_captions = {en for _, en in pairs["human"]}
    enc = harness.read_captions(raw, "enc")
    assert kept_captions == {enc[(image, n)] for image in held_out[:3] for n in range(5)}


def test_time_scorer_reports_cpu_time(checker):
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    pairs = harness.read_translation_pairs(raw, 20)
    assert len(pairs) == 20
    result = harness.time_scorer(checker, pairs, repeats=1)
    assert result["pairs"] == 20
    assert min(result["score_us_per_pair"], result["python_score_us_per_pair"], result["words_in_us_per_pair"]) > 0


def test_partial_keys_prefix_and_compound():
    index = default_index()
    assert {"bicy", "bicyc"} <= index.partial_keys("bicyclist")
    assert {"chair", "lift"} <= index.partial_keys("chairlift")
    # "carpet" is itself a gloss stem, so it is not split into "car" and "pet".
    assert "car" not in index.partial_keys("carpet")
    assert "bicyc" in index.prefixes("自行车")


def test_prefix_match_covers_word(checker):
    result = checker.score("一个自行车手在路上。", "A bicyclist on the road .")
    assert result.subscores["en_coverage"] == 1.0
    assert result.subscores["en_unmatched"] == 0.0


def test_unmatched_colour_lowers_score(checker):
    # "brown" has no counterpart: one unmatched word, and the colours do not agree.
    result = checker.score("两只狗在雪地上玩耍。", "Two brown dogs play in the snow .")
    assert result.subscores["en_coverage"] == pytest.approx(4 / 5)
    assert result.subscores["en_unmatched"] == 1.0
    assert result.subscores["colours"] == 0.0
    assert result.subscores["counts"] == 1.0
    matching = checker.score("两只棕色的狗在雪地上玩耍。", "Two brown dogs play in the snow .")
    assert matching.subscores["colours"] == 1.0
    assert matching.combined > result.combined


def test_count_mismatch_subscore(checker):
    result = checker.score("三只狗在雪地上玩耍。", "Two dogs play in the snow .")
    assert result.subscores["counts"] == 0.0
    assert "colours" not in result.subscores


def test_translation_pair_scores(checker):
    result = checker.score("狗在雪地上玩耍。", "The dogs play on the snow .")
    assert result.subscores["en_coverage"] == 1.0
    assert result.subscores["zh_coverage"] == 1.0
    assert result.subscores["length"] == 1.0
    assert result.combined > 0.95
    assert checker.is_translation("狗在雪地上玩耍。", "The dogs play on the snow .")[0]


def test_same_image_caption_scores(checker):
    # An independently written caption of the same Flickr8k image: of two, brown, dog, playfully,
    # fight and snow, "brown" and "snow" have no counterpart.
    result = checker.score("两只狗在打闹。", "Two brown dogs playfully fight in the snow .")
    assert result.subscores["en_coverage"] == pytest.approx(4 / 6)
    assert result.combined < CONFIG.translate_threshold


def test_brand_mismatch_rejected(checker):
    accepted, result = checker.is_translation("iPhone 13 手机壳", "a Samsung 12 phone case")
    assert result.subscores["tokens"] == 0.0
    assert not accepted


def test_hard_rules(checker):
    assert checker.score("A dog runs", "a dog runs").rule == "identical"
    assert checker.score("A dog runs on grass", "a dog on the grass").rule == "zh_not_chinese"
    assert checker.score("一只狗在草地上跑", "一只狗在草地上跑 dog").rule == "en_is_chinese"
    assert checker.score("一只狗在草地上跑", "一只狗在草地上跑 dog").combined == 0.0


def test_detail_lists_subscores(checker):
    detail = checker.score("狗在雪地上玩耍。", "The dogs play on the snow .").detail()
    assert detail.startswith("combined=0.99 en_coverage=1.00 zh_coverage=1.00")


def test_threshold_from_config():
    strict = TranslateChecker(CONFIG.replace(translate_threshold=0.999))
    assert not strict.is_translation("两只棕色的狗在雪中打闹。", "Two brown dogs wrestle in the snow .")[0]


def make_bigram_encoder():
    """A character-bigram hashing encoder: real text in, fixed 64-dim vectors out."""

    def encode(texts):
        vectors = []
        for text in texts:
            vector = [0.0] * 64
            for a, b in zip(text, text[1:]):
                vector[zlib.crc32((a + b).encode()) % 64] += 1.0
            vectors.append(vector)
        return vectors

    return encode


def test_embedding_subscore_from_config():
    config = CONFIG.replace(embedding_model="test_translate:make_bigram_encoder",
                            weights={**CONFIG.weights, "embedding": 1.0})
    result = TranslateChecker(config).score("一只狗", "一只狗 dog")
    assert result.rule == "en_is_chinese"
    zh, en = "狗在雪地上玩耍。", "The dogs play on the snow ."
    result = TranslateChecker(config).score(zh, en)
    a, b = make_bigram_encoder()([zh, en])
    expected = sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))
    assert result.subscores["embedding"] == pytest.approx(max(0.0, expected))
    without = TranslateChecker(CONFIG).score(zh, en)
    assert "embedding" not in without.subscores


def test_invalid_embedding_model():
    with pytest.raises(ValueError, match="module:callable"):
        TranslateChecker(CONFIG.replace(embedding_model="no_colon_here"))


def test_harness_subset_flickr8k():
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    pairs = harness.build_pairs(raw, "test", limit=100)
    assert len(pairs["human"]) == 500
    report = harness.evaluate(pairs, CONFIG)
    kinds = report["kinds"]
    assert kinds["other_image"]["auc"] >= 0.98
    # On these 100 images the scorer gives 0.9995, 0.9735, 0.9222, 0.9470 and 0.8822.
    assert kinds["zhc_same_image"]["auc"] >= 0.96
    assert kinds["zhc_same_image"]["f1"] >= 0.90
    assert kinds["other_caption_same_image"]["auc"] >= 0.93
    assert kinds["other_caption_same_image"]["f1"] >= 0.86


def test_roc_auc_ties():
    import numpy as np

    harness = load_harness()
    assert harness.roc_auc(np.array([1.0, 1.0]), np.array([0.0, 0.0])) == 1.0
    assert harness.roc_auc(np.array([0.5]), np.array([0.5])) == 0.5
    assert harness.roc_auc(np.array([0.2, 0.8]), np.array([0.5])) == 0.5
