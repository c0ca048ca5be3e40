"""Thresholds and switches of the caption stages, with their defaults in one place.

Every caption stage (normalization, quality rules, language ID, Chinese script, translate-check,
caption frequency) reads its limits from a ``CaptionConfig``. The CLI and the pipeline build one
from the run options, and tests build one with the fields they change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

# Languages whose captions go to the zh slot. lid.176 labels Cantonese "yue" and Wu "wuu"; the
# record keeps that label in lid_zh so a user can still drop them.
ZH_LABELS = ("zh", "yue", "wuu")


def bundled_list(name: str) -> str:
    """Return the path of a list file shipped in ``bm6b/filters/blocklists``."""
    return str(resources.files("bm6b.filters").joinpath("blocklists", name))


@dataclass
class CaptionConfig:
    # Normalization.
    fix_mojibake: bool = True  # run ftfy's encoding repair on captions that contain Latin-1 or cp1252 characters
    strip_html: bool = True  # unescape HTML entities and remove HTML tags
    join_han_spaces: bool = True  # delete spaces between two Han characters ("一只 狗" -> "一只狗")
    max_input_chars: int = 4096  # captions are cut to this many characters before any other step

    # Quality rules. zh lengths count Han characters plus Latin or digit words; en lengths count
    # whitespace-separated words and characters without spaces. BM-6B dropped texts under 5
    # characters counting punctuation; 4 Han characters ("奔跑的狗。" is 5 characters) keeps the
    # short human captions of Flickr8k-CN.
    min_zh_chars: int = 4
    max_zh_chars: int = 256
    min_en_words: int = 2
    min_en_chars: int = 5
    max_en_words: int = 200
    max_special_char_ratio: float = 0.25  # symbols other than sentence punctuation, over non-space characters
    max_char_run: int = 6  # the longest run of one repeated letter or symbol (digits excluded)
    max_repeated_word_ratio: float = 0.5  # share of words that repeat an earlier word of the same caption
    min_words_for_repeat_check: int = 6
    strip_boilerplate: bool = True  # remove stock-photo phrases matched by the boilerplate pattern files
    boilerplate_files: tuple[str, ...] = (bundled_list("boilerplate.txt"),)
    blocklist_files: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "en": (bundled_list("blocklist_en.txt"),),
            "zh": (bundled_list("blocklist_zh.txt"),),
        }
    )

    # Whole-run caption frequency: drop a caption seen in more than this many rows (Wukong used 10).
    # 0 turns the step off.
    max_caption_repeats: int = 10

    # Language ID (fastText lid.176, bundled lite model).
    # Keys are slots (zh, en) or single labels (yue, wuu). The zh score sums zh, yue and wuu.
    min_lid_confidence: dict[str, float] = field(default_factory=lambda: {"zh": 0.5, "en": 0.25})
    default_min_lid_confidence: float = 0.5  # for languages missing from min_lid_confidence
    zh_labels: tuple[str, ...] = ZH_LABELS
    mixed_second_min: float = 0.2  # zh and en both at least this likely mark the caption as mixed
    mixed_script_min_share: float = 0.2  # or both Han and Latin letters hold at least this share
    # A caption from an explicit zh or en column leaves its slot only when language ID finds another
    # language with at least this probability; short captions often score low in their own language.
    column_override_confidence: float = 0.9
    han_script_override: float = 0.6  # a caption whose letters are at least this share Han, and no kana or hangul, is zh
    convert_traditional: bool = False  # OpenCC t2s on traditional or mixed zh captions, keeping the original

    # Translate-check. Off by default: sources whose zh and en captions were written independently
    # (Flickr8k-CN, mixed web crawls) are not translations and would be rejected.
    translate_check: bool = False
    # The combined score is sigmoid(translate_bias + sum of weight * sub-score);
    # the weights were fitted with ``benchmarks/translate_check.py --fit --split train``.
    translate_threshold: float = 0.5  # combined score below this rejects the pair as translation_mismatch
    translate_bias: float = -11.735
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "en_coverage": 3.903,
            "zh_coverage": -0.914,
            "coverage_min": 7.537,
            "en_unmatched": -0.202,  # per unmatched English content word, at most 6
            "zh_unmatched": -0.009,  # per run of unmatched Chinese content characters, at most 6
            "length": 5.873,
            "colours": 1.68,
            "counts": 0.375,
            "tokens": 3.0,  # hand-set: a pair whose digits and Latin tokens all differ loses 3 logits
            "embedding": 0.0,
        }
    )
    length_ratio_low: float = 0.25  # CJK-aware length ratio outside [low, high] gives a zero length sub-score
    length_ratio_high: float = 4.0
    zh_chars_per_en_word: float = 1.6  # expected Han characters per English word
    # An encoder file from ``bm6b train-text-encoder``, or "module:callable" returning an encoder; None turns it off.
    embedding_model: str | None = None
    embedding_center: float = 0.5  # cosine that neither raises nor lowers the combined score
    translate_min_zh_han_share: float = 0.3  # the zh side must be at least this share Han among its letters
    translate_max_en_han_share: float = 0.1  # the en side may hold at most this share of Han letters

    def __post_init__(self) -> None:
        # The length sub-score falls from 1 at half or twice the expected length to 0 at these
        # bounds, so each bound must lie outside [0.5, 2].
        if not 0.0 < self.length_ratio_low < 0.5:
            raise ValueError(f"invalid length_ratio_low {self.length_ratio_low}: expected a value between 0 and 0.5")
        if not self.length_ratio_high > 2.0:
            raise ValueError(f"invalid length_ratio_high {self.length_ratio_high}: expected a value above 2")
        if not self.zh_labels:
            raise ValueError("zh_labels is empty: name at least one fastText label for Chinese, such as 'zh'")

    def min_confidence(self, label: str) -> float:
        return self.min_lid_confidence.get(label, self.default_min_lid_confidence)

    def replace(self, **changes: Any) -> CaptionConfig:
        return dataclasses.replace(self, **changes)
