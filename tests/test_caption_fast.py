"""The compiled caption rules (``_caption_fast``) give the same results as the pure-Python rules.

Each check runs a public function of ``text_normalize``, ``text_quality``, ``lid`` or ``captions``
twice, once with the compiled module and once with every module's ``_fast`` set to None, and
compares every output: texts, reject reasons, detail strings, language-ID labels and scores.
"""

from __future__ import annotations

import contextlib
import copy
import html
import os
import shutil

import pytest

from bm6b.filters import captions, lid, speedups, text_normalize, text_quality
from bm6b.filters.caption_config import CaptionConfig, bundled_list
from text_data import coco_captions, flickr8k_captions, laion_texts, multi30k_captions

MODULES = (text_normalize, text_quality, lid, captions)
FAST = speedups.compiled("_caption_fast")
requires_compiled = pytest.mark.skipif(FAST is None, reason="bm6b.filters._caption_fast is not built or BM6B_PURE_PYTHON is set")

CONFIGS = {
    "default": CaptionConfig(),
    "traditional": CaptionConfig(convert_traditional=True),
    "no_boilerplate": CaptionConfig(strip_boilerplate=False),
    "strict": CaptionConfig(
        min_lid_confidence={"zh": 1, "en": 0.3, "yue": 0.2},  # an int minimum keeps its type in the score
        max_char_run=3,
        min_words_for_repeat_check=2,
        max_repeated_word_ratio=0.2,
        han_script_override=0.3,
        column_override_confidence=0.5,
        max_special_char_ratio=0.1,
        min_zh_chars=2,
        max_zh_chars=12,
        max_en_words=8,
    ),
    # "ja" is a Chinese label here and also joins the Chinese score of Han text. Paths given as lists
    # take the blocklist's TypeError branch.
    "custom_labels": CaptionConfig(
        zh_labels=("zh", "ja"),
        min_lid_confidence={"zh": 0.3, "ja": 0.9, "en": 0.5},
        blocklist_files={"en": [bundled_list("blocklist_en.txt")], "zh": [bundled_list("blocklist_zh.txt")]},
    ),
}
CONFIG_NAMES = {id(config): f"<{name} config>" for name, config in CONFIGS.items()}


def _blocklist_terms() -> list[str]:
    terms = []
    for name in ("blocklist_en.txt", "blocklist_zh.txt"):
        with open(bundled_list(name), encoding="utf-8") as f:
            terms += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return terms


HAND_WRITTEN = [
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "穿着粉红色连衣裙的孩子爬上楼梯，进入一个入口。",
    "一只黑狗和一只白狗在草地上玩耍",
    "A MAN IS SKIING ON THE SNOW SLOPES",
    "围着围裙的女人。",
    "33 Vertical Slurry Pump",
    "金马伦景点 The Boh Tea Plantation",
    "Tom &amp; Jerry&#39;s  house\n",
    "&amp;quot;quoted&amp;quot; <b>bold</b> text",
    "Ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ　ｈｅｒｅ",
    "zero\u200bwidth\u200b joiner\ufeff text",
    "emoji 🐶🐶 dog 😀 on the beach",
    "ひらがなとカタカナの文章です",
    "한국어 문장입니다 강아지",
    "日本の猫はかわいいです",
    "猫と犬が公園で遊んでいる",
    "lone \ud800 surrogate caption here",
    "\ud83d lone high surrogate",
    "",
    "   ",
    "\t\n",
    "x",
    "İstanbul İS a CITY in Turkey",
    "ſtock photo of a dog",
    "\u212a-9 unit dog at work",
    "photo.tıf",
    "https://example.com/images/dog.jpg",
    "www.example.com/page",
    "HTTP://EXAMPLE.COM",
    "my trip to rome.JPEG",
    "photo .png",
    "a png file on a desk",
    "IMG_20190312_1432",
    "DSC01234",
    "Screenshot-2020",
    "image_12",
    "red-car-on-the-road",
    "red_car_on",
    "123-456-789",
    "日本-大阪-旅行",
    "12345 678",
    "!!! ??? ...",
    "$$$ ### %%%",
    "Woooooooow so cool",
    "aaaaaaa",
    "1111111111 numbers",
    "好好好好好好好好的天气",
    "the the the the the the the dog",
    "狗狗狗狗狗狗狗狗狗狗狗狗",
    "小狗小狗小狗小狗小狗小狗",
    "dog dog dog dog cat cat cat cat bird",
    "Dog DOG dog_1 dog-1 DOG_1 cat",
    "stock photo of a red car",
    "Royalty-free image of a dog — Stock Photo #123456",
    "可爱的小猫在草地上 图库矢量图片",
    "北京故宫的雪景 查看源网页",
    "花のイラスト ストック写真",
    "-- stock photo | a red car :: ",
    "這是一個傳統的中文句子，裡面有很多繁體字。",
    "这是一个简体中文句子。",
    "人在水里",
    "一个人",
    "中文，英文！混合？（括号）",
    "中文 ，空格",
    "中 文 字",
    "中，，连续",
    "半角,标点",
    "（括号）开头",
    "中文）（括号",
    "\x1b[1;31mred\x1b[0m text here",
    "control\x07char text",
    "café crème brûlée",
    "Ã©tÃ© mojibake text",
    "ＡＢＣ１２３",
    "①②③ circled numbers",
    "x² + y² = z²",
    "Ⅻ roman numeral",
    "½ cup of sugar",
    "𠀀𠀁𠀂 extension B han",
    "\U0002a6e0\U0002a6e1 unassigned",
    "兀 compatibility ideograph",
    "Ein Hund läuft über die Wiese.",
    "Un chien court dans l'herbe.",
    "Pes běží po trávě.",
    "Ünïcödé ÀÉÎÕÜ WORDS",
    "ΕΛΛΗΝΙΚΑ κείμενο",
    "русский текст про собаку",
    "line\u2028separator text",
    "nbsp\u00a0text here",
    "中文\u3000全角空格",
    "a\u0308 combining",
    "tab\tseparated\twords",
    " leading and trailing ",
    "double  space",
    "a" * 5000,
    "word " * 300,
    "中" * 300,
    "好的" * 300,
    "long caption " * 8000,
    "一只狗 " * 20000,
] + [
    form
    for term in _blocklist_terms()
    for form in (f"a photo of {term} on a table", f"一张{term}的照片", term, f"{term.upper()} at the start", f"it ends with {term.title()}")
]


def variants(text: str) -> list[str]:
    """Return forms of a real caption that take other paths through the rules."""
    full_width = "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)
    return [
        text.upper(),
        full_width,
        html.escape(text),
        html.escape(html.escape(text)),
        "\u200b".join(text.split(" ")),
        text + " 🐶",
        text + " ねこ",
        text + " 강아지",
        text[: len(text) // 2] + "\ud800" + text[len(text) // 2 :],
        f"  {text}\n",
        text + "!!!!!!!!",
    ]


@contextlib.contextmanager
def pure_python():
    """Run the block with every caption module's compiled rules switched off."""
    saved = [module._fast for module in MODULES]
    for module in MODULES:
        module._fast = None
    try:
        yield
    finally:
        for module, fast in zip(MODULES, saved):
            module._fast = fast


def run_both(function, *args):
    """Return function(*args) with the compiled rules and with pure Python; each gets its own copy of dicts and lists.

    An exception counts as the result ("raised", exception type name), so both must raise the same type.
    """
    def copied():
        return [copy.deepcopy(arg) if isinstance(arg, (dict, list)) else arg for arg in args]

    def call():
        try:
            return function(*copied())
        except Exception as err:
            return "raised", type(err).__name__

    compiled = call()
    with pure_python():
        pure = call()
    return compiled, pure


def text_mismatches(texts: list[str], model) -> list[str]:
    """Compare the per-text functions on ``texts`` and on their normalized forms; return the differences."""
    config = CONFIGS["default"]
    found = []

    def compare(name, function, *args):
        compiled, pure = run_both(function, *args)
        if compiled != pure or type(compiled) is not type(pure):
            printable_args = [CONFIG_NAMES.get(id(arg)) or (arg[:80] if isinstance(arg, str) else arg) for arg in args]
            found.append(f"{name}{tuple(printable_args)!r}: compiled {compiled!r} != pure {pure!r}")

    for text in texts:
        for config_name in ("default", "strict"):
            compare("normalize_caption", text_normalize.normalize_caption, text, CONFIGS[config_name])
        normalized = text_normalize.normalize_caption(text, config)
        for candidate in {text, normalized}:
            if not candidate:
                continue
            compare("junk_issue", text_quality.junk_issue, candidate)
            for language in ("en", "zh", "de"):
                for config_name in CONFIGS:
                    compare("content_issue", text_quality.content_issue, candidate, language, CONFIGS[config_name])
            compare("script_shares", lid.script_shares, candidate)
            compare("chinese_script", lid.chinese_script, candidate)
            compare("predict_labels", lid.predict_labels, candidate, model)
            with pure_python():
                probs = lid.predict_labels(candidate, model)
            for config_name in CONFIGS:
                compare("identify_from_labels", lambda t, p, c: (lid.identify_from_labels(t, p, c), p),
                        candidate, probs, CONFIGS[config_name])
    return found


def records_from(texts: list[str]) -> list[dict]:
    """Build records of every shape the caption stages accept, cycling through ``texts``."""
    records = []
    for i in range(len(texts)):
        a, b, c = texts[i], texts[(i + 1) % len(texts)], texts[(i + 2) % len(texts)]
        shape = i % 7
        if shape == 0:
            records.append({"caption_zh": a, "caption_en": b, "captions": []})
        elif shape == 1:
            records.append({"caption_en": a, "captions": [b, c]})
        elif shape == 2:
            records.append({"captions": [a]})
        elif shape == 3:
            records.append({"caption_zh": a})
        elif shape == 4:
            records.append({"caption_zh": None, "caption_en": a, "captions": None})
        elif shape == 5:
            records.append({"caption_zh": b, "caption_en": a, "captions": [c, ""]})
        else:
            records.append({"caption_zh": "", "caption_en": None, "captions": []})
    return records


def record_mismatches(texts: list[str], model) -> list[str]:
    """Compare normalize_record and assign_languages_batch on records built from ``texts``."""
    found = []
    records = records_from(texts)

    def run(config):
        normalized = [captions.normalize_record(record, config) for record in copy.deepcopy(records)]
        accepted = [record for record, failure in normalized if failure is None]
        assigned = captions.assign_languages_batch(accepted, model, config)
        # Language ID on captions that normalization did not touch, as assign_languages allows.
        raw = captions.assign_languages_batch(copy.deepcopy(records), model, config)
        return normalized, assigned, raw

    for config_name, config in CONFIGS.items():
        compiled, pure = run_both(run, config)
        if "raised" in (compiled[0], pure[0]):
            if compiled != pure:
                found.append(f"{config_name}: compiled {compiled[:2]!r} != pure {pure[:2]!r}")
            continue
        for part, compiled_part, pure_part in zip(("normalize_record", "assign_languages_batch", "raw records"), compiled, pure):
            for index, (compiled_row, pure_row) in enumerate(zip(compiled_part, pure_part)):
                if compiled_row != pure_row:
                    found.append(f"{config_name} {part} #{index}: compiled {compiled_row!r} != pure {pure_row!r}")
            if len(compiled_part) != len(pure_part):
                found.append(f"{config_name} {part}: {len(compiled_part)} rows != {len(pure_part)}")
    return found


@pytest.fixture(scope="module")
def model():
    return lid.load_lid_model()


class WrapperOnlyModel:
    """A model without the native predictor ``f``, so language ID goes through ``model.predict``."""

    def __init__(self, model):
        self._model = model

    def predict(self, text, k=1, threshold=0.0):
        return self._model.predict(text, k=k, threshold=threshold)


def test_compiled_module_built_where_compiler_exists():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH, so the compiled module is optional")
    if speedups.pure_python():
        pytest.skip("BM6B_PURE_PYTHON is set")
    assert FAST is not None, "a C compiler exists but bm6b.filters._caption_fast did not import; run setup.py build_ext"
    for module in MODULES:
        assert module._fast is FAST, f"{module.__name__} does not use the compiled rules"


def test_pure_python_switch(monkeypatch):
    monkeypatch.setenv("BM6B_PURE_PYTHON", "1")
    assert speedups.compiled("_caption_fast") is None


@requires_compiled
def test_hand_checked_values():
    config = CONFIGS["default"]
    # 8 tokens, 2 distinct: 1 - 2/8 = 0.75 repeat.
    issue = FAST.content_issue("the the the the the the the dog", "en", config)
    assert str(issue) == "repeated_words: 0.75 of 8 tokens repeat > 0.5"
    # 7 equal letters are a run longer than max_char_run (6), and runs of digits do not count.
    assert str(FAST.content_issue("a caaaaaaat", "en", config)) == "char_run: 'aaaaaaa' repeats one character more than 6 times"
    assert FAST.content_issue("room 1111111111 here", "en", config) is None
    # 3 Han characters plus 1 Latin word is 4, the minimum.
    assert FAST.content_issue("一只狗 dog", "zh", config) is None
    assert str(FAST.content_issue("一只狗", "zh", config)) == "too_short: 3 Chinese characters and words < 4"
    # 3 of 8 non-space characters are special.
    assert str(FAST.content_issue("$$$ abcde", "en", config)) == "special_chars: special-character ratio 0.38 > 0.25"
    assert FAST.junk_issue("red-car-on-the-road").rule == "slug"
    assert FAST.junk_issue("my trip to rome.JPEG").rule == "file_name"
    assert FAST.junk_issue("12345 678").rule == "no_letters"
    assert FAST.normalize_caption("穿着粉红色连衣裙的孩子，进入。") == "穿着粉红色连衣裙的孩子，进入。"
    assert FAST.normalize_caption("Ｆｕｌｌ ｗｉｄｔｈ,") == "Full width,"
    assert FAST.chinese_script("一个人") == lid.SIMPLIFIED
    assert FAST.chinese_script("人在水里") == lid.BOTH
    assert FAST.script_shares("金马伦景点 The Boh Tea Plantation") == (5 / 9, 4 / 9, False)


@requires_compiled
def test_hand_written_captions_same(model):
    texts = HAND_WRITTEN + [variant for text in HAND_WRITTEN[:12] for variant in variants(text)]
    mismatches = text_mismatches(texts, model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_hand_written_records_same(model):
    mismatches = record_mismatches(HAND_WRITTEN, model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_records_without_native_predictor_same(model):
    mismatches = record_mismatches(HAND_WRITTEN[:60], WrapperOnlyModel(model))
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


# Character pools for random captions. Each pool covers a class of characters that some rule tests.
RANDOM_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000",
    ".,;:!?'\"()-_/\\#$%&*+<=>@[]^`{|}~",
    "一只狗在草地上奔跑的孩子穿着红色衣服個們這裡傳統體字",
    "，！？：；（）、。《》「」『』【】",
    "ひらがなカタカナㇰㇱ한국어가각ㄱ",
    "\u0300\u0301\u0308\u0338\u3099\u309a",
    "😀🐶🎉✓★●■♥",
    "İıſ\u212aKk",
    "٠١٢٣४५৬௭½¼Ⅻⅻ²³①",
    "ÀÉÎÕÜàéîõüßÿŒœŠšŸŽžƒˆ˜†‡‰‹›€™",
    "\u00ad\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2066\ufeff\ufe0f\U000e0041",
    "\x00\x01\x07\x1b\x7f\x80\x9b\x9d",
    "ＡＢＣａｂｃ０１２！＂＃",
    "兀豈更車\U00020000\U0002a6e0\U00030000\U0003134f\U00031350",
    "αβγΣσςΑΒΓ абвгдАБВ",
]
RANDOM_WORDS = ["stock photo", "http://", "www.", "Shutterstock", "图库照片", "查看源网页", "porn", "xxx", "色情", ".jpg",
                "IMG_", "DSC", "&amp;", "&#39;", "<b>", "</i>", "\x1b[31m"]


def random_texts(count: int, seed: int, surrogates: bool) -> list[str]:
    """Return ``count`` random captions built from RANDOM_POOLS and RANDOM_WORDS."""
    import random

    rng = random.Random(seed)
    pools = RANDOM_POOLS + (["\ud800\udfff\ud83d"] if surrogates else [])
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.15:
                parts.append(rng.choice(RANDOM_WORDS))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        texts.append("".join(parts))
    return texts


@requires_compiled
def test_random_texts_same(model):
    mismatches = text_mismatches(random_texts(1500, seed=1, surrogates=True), model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_random_records_same(model):
    mismatches = record_mismatches(random_texts(1500, seed=2, surrogates=True), model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_literal_gate_pre_check_same():
    import random

    from bm6b.filters.literal_gate import LiteralGate

    config = CONFIGS["default"]
    gates = [text_quality._boilerplate_gate(tuple(config.boilerplate_files)), text_quality._blocklist_gate_of(config),
             LiteralGate([r"\bab\b", "xyz", "图"]), LiteralGate(["a"]), LiteralGate([r"\d+"])]
    literals = [literal for gate in gates if gate._automaton is not None for literal in gate._automaton.keys()]
    pieces = literals + [literal.upper() for literal in literals] + ["a", " ", "x", "中", "İ", "ſ", "\u212a", "\ud800", "\x00"]
    rng = random.Random(4)
    texts = HAND_WRITTEN + ["".join(rng.choice(pieces)[: rng.randint(1, 6)] for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    for gate in gates:
        for text in texts:
            assert FAST.literal_gate_may_match(gate, text) == gate.may_match(text), (gate, text)


@requires_compiled
def test_str_subclass_captions_same(model):
    class Caption(str):
        pass

    mismatches = record_mismatches([Caption(text) for text in HAND_WRITTEN[:40]], model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


def real_captions(per_source: int) -> list[str]:
    """Return up to ``per_source`` captions of each real caption set, or skip the test when the data is absent."""
    texts = [text for text in laion_texts()[:per_source] if isinstance(text, str)]
    for kind in ("enc", "zhb", "zhc", "zhg", "zhm"):
        texts += list(flickr8k_captions(kind).values())[:per_source]
    texts += coco_captions(limit=per_source)
    for language in ("en", "de", "fr", "cs"):
        texts += multi30k_captions(language)[:per_source]
    return texts


@requires_compiled
def test_real_captions_same(model):
    texts = real_captions(per_source=800)
    mismatches = text_mismatches(texts, model)
    assert not mismatches, f"{len(mismatches)} differences in {len(texts)} captions, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_real_caption_variants_same(model):
    texts = [variant for text in real_captions(per_source=60) for variant in variants(text)]
    mismatches = text_mismatches(texts, model)
    assert not mismatches, f"{len(mismatches)} differences in {len(texts)} captions, first: " + "\n".join(mismatches[:5])


@requires_compiled
def test_real_records_same(model):
    texts = real_captions(per_source=1000)
    texts += [variant for text in texts[::40] for variant in variants(text)]
    mismatches = record_mismatches(texts, model)
    assert not mismatches, f"{len(mismatches)} differences, first: " + "\n".join(mismatches[:5])


def test_pure_python_env_reaches_modules():
    # The switch is read when the modules are imported; a fresh interpreter shows it.
    import subprocess
    import sys

    code = ("from bm6b.filters import captions, lid, text_normalize, text_quality; "
            "print(all(m._fast is None for m in (captions, lid, text_normalize, text_quality)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "BM6B_PURE_PYTHON": "1"}, check=True)
    assert result.stdout.strip() == "True"
