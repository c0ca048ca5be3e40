"""Caption normalization rules, checked on real LAION, Flickr8k-CN and COCO captions."""

from __future__ import annotations

import time

import pytest

from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.text_normalize import normalize_caption, nfkc_keep_zh_punct, unescape_html
from text_data import coco_captions, flickr8k_captions, laion_texts


@pytest.fixture(scope="module")
def laion():
    return laion_texts()


def test_html_entities_laion(laion):
    assert laion[95] == "&quot;Keep Calm&quot; - Blue Canvas"
    assert normalize_caption(laion[95]) == '"Keep Calm" - Blue Canvas'
    assert normalize_caption(laion[1047]) == "Finally Hip FH Baseball Team - A's Colorway"
    assert normalize_caption(laion[2287]).startswith("La rédaction du magazine PC Achat a sélectionné le portable")


def test_escaped_tags_are_removed_after_unescape(laion):
    assert laion[86].startswith("Researcher holding two skulls of the never seen Truong Son muntjac (&lt;i&gt;Truong Son")
    assert normalize_caption(laion[86]) == (
        "Researcher holding two skulls of the never seen Truong Son muntjac ( Truong Son ... / ©: WWF-UK"
    )


def test_double_escaped_entity():
    assert unescape_html("Tom &amp;amp; Jerry") == "Tom & Jerry"
    assert normalize_caption("&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; text") == "bold text"


def test_html_tags_laion(laion):
    assert normalize_caption(laion[474]) == "Orchid Jungle Hawaiian Dresses 100% Rayon"
    assert normalize_caption(laion[6]) == "Yale-New Haven Children's Hospital Ribbon Cutting Ceremony."
    assert normalize_caption(laion[1305]) == "Transformers: Age of Extinction"


def test_comparison_signs_are_not_tags():
    assert normalize_caption("1 < 2 and 3 > 2") == "1 < 2 and 3 > 2"


def test_zero_width_and_nbsp_laion(laion):
    assert laion[504].startswith("\u200b")
    assert normalize_caption(laion[504]) == "Bappi Lahrri Records for New Film by Govind Sakariya"
    assert "\xa0" in laion[193]
    assert normalize_caption(laion[193]) == "Hartford Slim-Fit Linen Trousers"


def test_control_and_format_characters():
    assert normalize_caption("a\tb\nc\x00d\u2028e") == "a b c d e"
    assert normalize_caption("soft\u00adhyphen\ufeff zero\u200bwidth") == "softhyphen zerowidth"
    assert normalize_caption("\u202eevil\u202c text") == "evil text"


def test_emoji_symbols_kept(laion):
    assert normalize_caption(laion[689]) == "★ Elder Scrolls Online ★ - L36 A Novel Idea"


def test_cyrillic_and_kana_kept(laion):
    assert normalize_caption(laion[1168]) == "Кроссовки Nike Dunk Retro QS"
    assert normalize_caption(laion[768]) == "CHIMERA GAMESのアーカイブ画像:Vol.7FMX NIGHT SESSION"


def test_half_width_katakana_widened():
    assert normalize_caption("ｶﾀｶﾅ") == "カタカナ"


def test_mojibake_utf8_read_as_latin1():
    text = "一个穿着泳装的女人"
    broken = text.encode("utf-8").decode("latin-1")
    assert broken != text
    assert normalize_caption(broken) == text
    assert normalize_caption("Uwe Umstätter".encode("utf-8").decode("cp1252")) == "Uwe Umstätter"


def test_mojibake_repair_can_be_turned_off():
    broken = "café".encode("utf-8").decode("cp1252")
    assert normalize_caption(broken, CaptionConfig(fix_mojibake=False)) == "cafÃ©"


def test_full_width_letters_digits_folded():
    assert normalize_caption("ＡＢＣ１２３ 手机壳，很好！") == "ABC123 手机壳，很好！"


def test_chinese_punctuation_kept_after_han():
    assert nfkc_keep_zh_punct("一个女人，在海边（大连）！") == "一个女人，在海边（大连）！"
    assert nfkc_keep_zh_punct("Hello，world！") == "Hello,world!"


def test_spaces_between_han_removed():
    assert normalize_caption("一个 穿着 泳装的女人 ， 躺在海水里 。") == "一个穿着泳装的女人，躺在海水里。"
    assert normalize_caption("iPhone 13 手机壳") == "iPhone 13 手机壳"
    assert normalize_caption("漢字\u3000測試") == "漢字測試"


def test_spaces_between_han_kept_when_disabled():
    assert normalize_caption("一只 狗", CaptionConfig(join_han_spaces=False)) == "一只 狗"


def test_nfkc_compatibility_forms():
    assert normalize_caption("Website Template № 43384") == "Website Template No 43384"
    assert normalize_caption("ﬁne ①") == "fine 1"


def test_empty_and_non_string():
    assert normalize_caption(None) == ""
    assert normalize_caption("") == ""
    assert normalize_caption("   \u200b ") == ""
    assert normalize_caption(42) == ""


def test_input_cut_to_max_chars():
    assert normalize_caption("ab " * 10, CaptionConfig(max_input_chars=7)) == "ab ab a"


def test_flickr8k_chinese_unchanged():
    zhc = flickr8k_captions("zhc")
    caption = zhc["667626_18933d713e.jpg#0"]
    assert caption == "一个穿着泳装的女人躺在海水里。"
    assert normalize_caption(caption) == caption
    changed = [c for c in list(zhc.values())[:2000] if normalize_caption(c) != c.strip()]
    # Only captions with spaces between Han characters or ASCII forms change.
    assert all(" " in c or any("\uff01" <= ch <= "\uff5e" for ch in c) for c in changed)


def test_coco_stray_spaces_collapsed():
    captions = coco_captions(limit=5000)
    padded = [c for c in captions if c != c.strip()]
    assert padded
    for caption in padded:
        assert normalize_caption(caption) == " ".join(caption.split())


def test_text_changed_only_by_nfkc():
    # No entity, tag, control character or whitespace: only NFKC applies.
    assert normalize_caption("一个女孩，在海边。") == "一个女孩，在海边。"
    assert normalize_caption("Ａ１，狗") == "A1,狗"  # the comma follows a digit, not Han
    assert normalize_caption("ﬁne，狗") == "fine,狗"
    # NFKC turns U+00A8 (diaeresis) into a space and U+0308, so the whitespace step still runs.
    assert normalize_caption("狗\u00a8") == "狗 \u0308"


def test_lone_surrogates_become_replacement_character():
    # JSON "\ud800" escapes decode to lone surrogates, which UTF-8 and fastText cannot encode.
    assert normalize_caption("a dog \ud800 runs") == "a dog \ufffd runs"
    assert normalize_caption("\udc80\u732b") == "\ufffd\u732b"
    assert normalize_caption("\ud83d\ude00 smile") == "\ufffd\ufffd smile"
    normalize_caption("x \udfff y").encode("utf-8")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\x1b[1;32mGreen tea\x1b[0m in a glass cup", "Green tea in a glass cup"),  # SGR colour and reset
        ("\x1b[2J\x1b[HA dog running on the beach", "A dog running on the beach"),  # clear screen, cursor home
        ("\x1b[?25lloading... a cat on a sofa\x1b[?25h", "loading... a cat on a sofa"),  # private parameters
        ("\x1b(B\x1b[mA red car parked outside", "A red car parked outside"),  # what `tput sgr0` prints
        ("\x1b]0;user@host: ~\x07Two children playing football", "Two children playing football"),  # OSC title, BEL
        ("\x1b]8;;http://photos.test/1\x1b\\Sunset\x1b]8;;\x1b\\ over the sea", "Sunset over the sea"),  # OSC 8, ST
        ("\x1b7a bird\x1b8 on a branch", "a bird on a branch"),  # save and restore the cursor
        ("\x1b[31m一只猫\x1b[0m坐在窗台上", "一只猫坐在窗台上"),
        ("Tom &amp; Jerry \x1b[1mposter\x1b[22m", "Tom & Jerry poster"),
    ],
)
def test_terminal_escapes_removed(text, expected):
    assert normalize_caption(text) == expected


def test_bracket_text_without_escape_kept():
    assert normalize_caption("[2J hello") == "[2J hello"
    assert normalize_caption("Track [1m] remix") == "Track [1m] remix"
    assert normalize_caption("photo [31m] of a red wall, 第[3]张") == "photo [31m] of a red wall, 第[3]张"


def test_unterminated_escape_drops_only_esc():
    # A sequence cut off before its final byte or terminator is not removed, and its ESC becomes a space.
    assert normalize_caption("a cat on a mat \x1b[31") == "a cat on a mat [31"
    assert normalize_caption("\x1b]0;window title without end") == "]0;window title without end"


@pytest.mark.parametrize(
    "text",
    [
        "\x1b[" + "0" * 100_000,  # one CSI whose parameters never end
        "\x1b[" + " " * 100_000,  # ... whose intermediate bytes never end
        "\x1b]" + "a" * 100_000,  # one OSC string without a terminator
        "\x1b[1" * 33_000,  # many CSIs cut off by the next ESC
        "\x1b]x" * 33_000,
        "\x1b(" * 50_000,
    ],
)
def test_terminal_escapes_linear_time(text):
    # Each of these took under 0.03 s of CPU (2 shared cores, load average about 1). A search
    # that rescanned the text to its end from every ESC would need on the order of 10^9 steps.
    config = CaptionConfig(max_input_chars=200_000)
    started = time.process_time()
    normalize_caption(text, config)
    assert time.process_time() - started < 1.0
