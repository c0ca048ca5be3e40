"""The compiled translate-check scorer against the pure-Python reference, score for score."""

from __future__ import annotations

import pickle
import random
import shutil

import pytest

from bm6b.filters import speedups
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.translate import TranslateChecker, TranslateScore
from text_data import flickr8k_captions

# Pairs that reach each branch of the scorer. They include the hard rules, Latin words and digits
# on the zh side, and digits, colours and counts on the en side. Others have traditional
# characters, CJK Extension B, kana, overlapping dictionary words, or no Han at all.
HAND_PAIRS = [
    ("一个自行车手在路上。", "A bicyclist on the road ."),
    ("两只狗在雪地上玩耍。", "Two brown dogs play in the snow ."),
    ("两只棕色的狗在雪地上玩耍。", "Two brown dogs play in the snow ."),
    ("三只狗在雪地上玩耍。", "Two dogs play in the snow ."),
    ("两只狗在打闹。", "Two brown dogs playfully fight in the snow ."),
    ("一个人坐在缆车上。", "A man sits on a chairlift ."),
    ("穿红衣服的女孩在草地上跑。", "A girl in red runs on the grass ."),
    ("一隻狗在草地上跑。", "A dog runs on the grass ."),
    ("他说：有风湿性关节炎", "He says he has rheumatoid arthritis"),
    ("一个男孩在游泳池里游泳。", "A boy swims in the swimming pool ."),
    ("iPhone 12 放在桌子上", "An iPhone 12 on a table"),
    ("3个孩子在公园", "3 children in the park"),
    ("十个人在跑步", "ten people are running"),
    ("𠀀𠀁一只猫", "a cat"),
    ("猫の写真", "a photo of a cat"),
    ("A dog runs", "a dog runs"),
    ("A dog runs on grass", "a dog on the grass"),
    ("一只狗在草地上跑", "一只狗在草地上跑 dog"),
    ("一只狗", "一只狗"),
    ("", "a dog"),
    ("一只狗", ""),
    ("", ""),
    ("   ", " "),
    ("一只狗", "!!! ???"),
    ("狗" * 3000, "dog " * 3000),
    ("金发女人穿着粉红色的衬衫。", "A blonde woman in a pink shirt ."),
    ("一对夫妇在海边", "a couple by the ocean, isn't it nice"),
    ("一位老人\u200b在读报纸", "An old man reads the NEWSPAPER"),
    ("一个男人在骑摩托车 。", "A man rides a motorbike ."),
]


def same(fast: TranslateScore, reference: TranslateScore) -> bool:
    """Compare two scores exactly, the order of the sub-scores included (the detail string follows it)."""
    fast_fields = (fast.combined, fast.rule, list(fast.subscores.items()))
    return fast_fields == (reference.combined, reference.rule, list(reference.subscores.items()))


@pytest.fixture(scope="module")
def checker():
    checker = TranslateChecker(CaptionConfig())
    if checker._fast is None:
        pytest.skip("bm6b.filters._translate_fast is not built or BM6B_PURE_PYTHON is set")
    return checker


def test_compiled_scorer_built():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine, so the pure-Python scorer is expected")
    if speedups.pure_python():
        pytest.skip("BM6B_PURE_PYTHON is set")
    assert speedups.compiled("_translate_fast") is not None, "reinstall bm6b: the compiled scorer was not built"


def test_pure_python_switch(monkeypatch):
    monkeypatch.setenv("BM6B_PURE_PYTHON", "1")
    assert TranslateChecker(CaptionConfig())._fast is None


def test_pickle_rebuilds_compiled_scorer(checker):
    copy = pickle.loads(pickle.dumps(checker))
    assert copy._fast is not None and copy._fast is not checker._fast
    zh, en = HAND_PAIRS[1]
    assert same(copy.score(zh, en), checker.score(zh, en))


def test_hand_pairs_score_the_same(checker):
    for zh, en in HAND_PAIRS:
        assert same(checker.score(zh, en), checker._score_python(zh, en)), (zh, en)


def test_custom_config_scores_same():
    config = CaptionConfig()
    weights = dict(config.weights, colours=0.0)
    lenient = TranslateChecker(config.replace(translate_bias=0.0, weights=weights))
    if lenient._fast is None:
        pytest.skip("compiled scorer not built")
    for zh, en in HAND_PAIRS:
        assert same(lenient.score(zh, en), lenient._score_python(zh, en)), (zh, en)


def test_str_subclass_scores_same(checker):
    numpy = pytest.importorskip("numpy")
    zh, en = HAND_PAIRS[1]
    assert same(checker.score(numpy.str_(zh), numpy.str_(en)), checker._score_python(zh, en))


def test_far_negative_logit_scores_zero():
    # exp(1000) overflows a double: the Python scorer must return 0 as the compiled one does.
    checker = TranslateChecker(CaptionConfig(translate_bias=-1000.0))
    zh, en = HAND_PAIRS[1]
    assert checker._score_python(zh, en).combined == 0.0
    assert checker.score(zh, en).combined == 0.0


def flickr8k_pairs(limit_per_kind: int) -> list[tuple[str, str]]:
    english = flickr8k_captions("enc")
    keys = sorted(english)
    rng = random.Random(8)
    pairs = []
    for kind in ("zhb", "zhg", "zhc", "zhm"):
        chinese = flickr8k_captions(kind)
        matched = [(chinese[key], english[key]) for key in keys if key in chinese]
        pairs += rng.sample(matched, min(limit_per_kind, len(matched)))
        texts = sorted(chinese.values())
        pairs += [(rng.choice(texts), english[rng.choice(keys)]) for _ in range(limit_per_kind // 4)]
    return pairs


def hand_and_real_pairs(limit_per_kind: int) -> list[tuple[str, str]]:
    """Return HAND_PAIRS, followed by Flickr8k-CN pairs when the real data is present."""
    try:
        return HAND_PAIRS + flickr8k_pairs(limit_per_kind)
    except pytest.skip.Exception:
        return list(HAND_PAIRS)


def variants(zh: str, en: str) -> list[tuple[str, str]]:
    return [
        (zh + " iPhone 3", en),
        (zh, en + " with 2 dogs"),
        (zh.replace("。", " "), en.upper()),
        (zh + "１２", en + " 12"),
        ("ｄｏｇ" + zh, en),
        (zh + "😀", en + " café"),
        (en, en),
        (zh, zh),
    ]


def test_real_pairs_score_the_same(checker):
    pairs = flickr8k_pairs(3000)
    pairs += [variant for zh, en in pairs[:1000] for variant in variants(zh, en)]
    differences = [(zh, en) for zh, en in pairs if not same(checker.score(zh, en), checker._score_python(zh, en))]
    assert len(pairs) > 15000
    assert differences == []


def random_encoder(settings, rows: int, seed: int):
    import numpy

    from bm6b.filters.bilingual_encoder import BilingualEncoder

    rng = numpy.random.default_rng(seed)
    buckets = {language: numpy.sort(rng.choice(settings.buckets, rows, replace=False)) for language in ("zh", "en")}
    vectors = {language: rng.standard_normal((rows, 8)).astype(numpy.float32) for language in ("zh", "en")}
    return BilingualEncoder(settings, buckets, vectors)


ENCODER_TEXTS = [text for pair in HAND_PAIRS for text in pair] + [
    "ＡＢＣ１２３ 一只狗", "臺灣的狗", "㐀豈𠀀一只猫", "İstanbul ﬁsh", "K" * 5, "dog's toy, 2 balls", "一只\u200b狗",
]


@pytest.mark.parametrize("zh_max_ngram, en_bigrams, t2s", [(2, True, True), (3, False, False)])
def test_encoder_rows_match_python(zh_max_ngram, en_bigrams, t2s):
    from bm6b.filters.bilingual_encoder import FeatureSettings

    # Half of the buckets are stored, so about half of the features get a row and the rest are skipped.
    settings = FeatureSettings(buckets=4096, zh_max_ngram=zh_max_ngram, en_bigrams=en_bigrams, traditional_to_simplified=t2s)
    encoder = random_encoder(settings, 2048, seed=zh_max_ngram)
    if encoder._fast_rows is None:
        pytest.skip("compiled feature extraction not built")
    texts = list(ENCODER_TEXTS)
    try:
        english, chinese = flickr8k_captions("enc"), flickr8k_captions("zhb")
        texts += sorted(english.values())[:3000] + sorted(chinese.values())[:3000]
    except pytest.skip.Exception:
        pass  # the hand-written texts still run without ../shared
    for text in texts:
        for language in ("zh", "en"):
            assert encoder._table_rows(text, language) == encoder._table_rows_python(text, language), (text, language)
    assert encoder._table_rows("一只狗", "zh")  # some features of a common caption are stored
    with pytest.raises(ValueError, match="invalid language 'de'"):
        encoder._table_rows("ein Hund", "de")


def test_encoder_pickle_keeps_rows():
    from bm6b.filters.bilingual_encoder import FeatureSettings

    encoder = random_encoder(FeatureSettings(buckets=4096), 2048, seed=5)
    copy = pickle.loads(pickle.dumps(encoder))
    assert copy._table_rows("一只狗在跑", "zh") == encoder._table_rows("一只狗在跑", "zh")


def test_encoder_checker_scores_same():
    from bm6b.filters.bilingual_encoder import FeatureSettings

    config = CaptionConfig()
    config = config.replace(weights={**config.weights, "embedding": 11.6}, embedding_center=0.63)
    checker = TranslateChecker(config, encoder=random_encoder(FeatureSettings(buckets=4096), 2048, seed=7))
    if checker._fast is None:
        pytest.skip("compiled scorer not built")
    pairs = hand_and_real_pairs(500)
    for zh, en in pairs:
        fast, reference = checker.score(zh, en), checker._score_python(zh, en)
        assert same(fast, reference), (zh, en)
    assert "embedding" in checker.score(*HAND_PAIRS[1]).subscores


def test_summed_rows_same_bits_as_numpy():
    numpy = pytest.importorskip("numpy")
    from bm6b.filters import speedups

    module = speedups.compiled("_translate_fast")
    if module is None:
        pytest.skip("compiled scorer not built")
    rng = numpy.random.default_rng(3)
    # Rows of very different scales, so the float32 rounding depends on the order of the additions.
    table = rng.standard_normal((500, 64)).astype(numpy.float32) * rng.uniform(0.01, 100, (500, 1)).astype(numpy.float32)
    for count in list(range(1, 40)) + [200, 1000]:
        rows = [int(row) for row in rng.integers(0, 500, count)]
        expected = numpy.add.reduce(table.take(rows, axis=0), axis=0)
        assert module.summed_rows(table, rows).tobytes() == expected.tobytes(), count
    with pytest.raises(IndexError, match="table row 500 out of range for 500 rows"):
        module.summed_rows(table, [1, 500])


def reference_cosine(encoder, zh: str, en: str) -> float:
    """The encoder's cosine from the Python feature rows and numpy sums, as before compilation."""
    import math

    import numpy

    zh_rows, en_rows = encoder._table_rows_python(zh, "zh"), encoder._table_rows_python(en, "en")
    if not zh_rows or not en_rows:
        return 0.0
    a = numpy.add.reduce(encoder.vectors["zh"].take(zh_rows, axis=0), axis=0)
    b = numpy.add.reduce(encoder.vectors["en"].take(en_rows, axis=0), axis=0)
    norms = float(a @ a) * float(b @ b)
    return float(a @ b) / math.sqrt(norms) if norms > 0.0 else 0.0


def test_encoder_cosine_same_float():
    from bm6b.filters.bilingual_encoder import FeatureSettings

    encoder = random_encoder(FeatureSettings(buckets=4096), 2048, seed=9)
    if encoder._fast_cosine is None:
        pytest.skip("compiled encoder cosine not built")
    pairs = hand_and_real_pairs(500)
    for zh, en in pairs:
        assert encoder.cosine(zh, en) == reference_cosine(encoder, zh, en), (zh, en)
    assert encoder.cosine("", "a dog") == 0.0
