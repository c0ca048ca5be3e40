"""Caption dedup keys and n-gram settings on real Flickr8k-CN captions, read in place by caption id."""

from __future__ import annotations

import pytest

from bm6b.dedup import captions as C
from test_dedup_beam import make, run_transform


@pytest.fixture(scope="module")
def flickr_captions(shared_raw) -> dict[str, str]:
    folder = shared_raw / "flickr8k-cn"
    captions = {}
    for name in ("flickr8kzhc.caption.txt", "flickr8kenc.caption.txt"):
        with open(folder / name, encoding="utf-8") as handle:
            for line in handle:
                caption_id, _, text = line.rstrip("\n").partition(" ")
                captions[caption_id] = text
    return captions


def near(a: str, b: str, language: str, threshold: float = C.NearConfig.threshold) -> bool:
    return C.jaccard(C.shingles(a, language), C.shingles(b, language)) >= threshold


def test_exact_key_folds_script_width_punctuation():
    assert C.exact_key("這是一隻貓！") == C.exact_key("这是一只猫")
    assert C.exact_key("ＡＢＣ　１２３") == "abc123"
    assert C.exact_key("A dog , running .") == "adogrunning"
    assert C.exact_key("。！？") == ""
    assert C.exact_key(None) == ""


def test_shingles_by_language():
    assert C.shingles("一只小狗在跑", "zh") == {"一只小", "只小狗", "小狗在", "狗在跑"}
    assert C.shingles("A dog runs fast", "en") == {"a dog", "dog runs", "runs fast"}
    # Shorter than one n-gram: the whole text is the only shingle.
    assert C.shingles("猫", "zh") == {"猫"}
    with pytest.raises(ValueError, match="unknown caption language"):
        C.shingles("x", "fr")


def test_short_chinese_captions_stay_apart():
    # Word tokens would make each of these one token; character trigrams share nothing here.
    pairs = [("一只黑猫", "一只白猫"), ("草地上的狗", "草地上的猫"), ("一个男孩", "一个女孩"), ("红色的车", "蓝色的车")]
    for a, b in pairs:
        assert not near(a, b, "zh"), (a, b)
        assert C.exact_key(a) != C.exact_key(b)


def test_space_split_would_merge_nothing():
    # Whitespace tokenization makes a Chinese caption one "word": two near-identical captions
    # then share no shingle, which is why zh uses character n-grams.
    a, b = "一个人正在玩花样自行车", "有一个人正在玩花样自行车"
    assert len(a.split()) == 1
    assert near(a, b, "zh")


def test_real_exact_duplicate_sets(flickr_captions):
    # Hand-checked: the same English sentence written for three different photos.
    same_en = ["2114739371_83aa8bdb0e.jpg#enc#1", "2180480870_dcaf5ac0df.jpg#enc#1", "2503629305_055e9ec4b1.jpg#enc#1"]
    keys = {C.exact_key(flickr_captions[i]) for i in same_en}
    assert keys == {"adogrunsthroughthegrass"}
    # Hand-checked: another photo's sentence that differs in one word ("across").
    assert C.exact_key(flickr_captions["1514957266_a19827c538.jpg#enc#1"]) != "adogrunsthroughthegrass"
    assert not near(flickr_captions[same_en[0]], flickr_captions["1514957266_a19827c538.jpg#enc#1"], "en")


def test_real_chinese_near_duplicates(flickr_captions):
    # Hand-checked: the two captions mean the same and differ only by a leading 有
    # ("there is"), so their trigram Jaccard is 9/10.
    a = flickr_captions["2992614450_b5a6692239.jpg#zhc#0"]
    b = flickr_captions["3240351042_5d29c94b0e.jpg#zhc#0"]
    assert C.exact_key(a) != C.exact_key(b)
    assert near(a, b, "zh")
    # Hand-checked: the two captions differ only in a final 拍, which turns "holding a ball"
    # into "holding a racket". Their Jaccard of 8/9 stays below the 0.9 default.
    ball = flickr_captions["3231237864_8cb1c6d863.jpg#zhc#0"]
    racket = flickr_captions["3425061393_d093edb8da.jpg#zhc#0"]
    assert C.jaccard(C.shingles(ball, "zh"), C.shingles(racket, "zh")) == pytest.approx(8 / 9)
    assert not near(ball, racket, "zh")


def test_minhash_bands_agree_with_jaccard(flickr_captions):
    a = flickr_captions["2992614450_b5a6692239.jpg#zhc#0"]
    b = flickr_captions["3240351042_5d29c94b0e.jpg#zhc#0"]
    bands_a = C.lsh_band_keys(C.minhash(C.shingles(a, "zh")))
    bands_b = C.lsh_band_keys(C.minhash(C.shingles(b, "zh")))
    assert set(bands_a) & set(bands_b)
    unrelated = C.lsh_band_keys(C.minhash(C.shingles("一只黑猫", "zh")))
    assert not set(bands_a) & set(unrelated)


def test_exact_caption_dedup_matches_distinct_keys(flickr_captions):
    # The first Chinese caption of 300 photos, one record each: with near duplicates off,
    # the kept records must be exactly one per distinct exact key.
    ids = sorted(i for i in flickr_captions if i.endswith("#zhc#0"))[:300]
    rows = [make(f"{n:016x}", caption_zh=flickr_captions[i]) for n, i in enumerate(ids)]
    out = run_transform(C_DedupCaptions(near=False), rows)
    distinct = {C.exact_key(flickr_captions[i]) for i in ids}
    assert len(out["records"]) == len(distinct)
    assert len(out["records"]) + len(out["rejects"]) == len(rows)
    assert len(distinct) < len(rows)
    kept_keys = {C.exact_key(r["caption_zh"]) for r in out["records"]}
    assert kept_keys == distinct


def C_DedupCaptions(**kwargs):
    from bm6b.dedup import DedupCaptions

    return DedupCaptions(**kwargs)


def test_caption_threshold_out_of_range(tmp_path):
    from bm6b.cli import main
    from bm6b.dedup.config import DedupConfig
    from test_dedup_cli import _small_shards

    # 0 or less merged every caption pair that shared one MinHash band; above 1 or NaN merged none.
    for threshold in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="invalid caption dedup threshold"):
            C.NearConfig(threshold=threshold)
        with pytest.raises(ValueError, match="invalid caption dedup threshold"):
            DedupConfig(caption_threshold=threshold)
    assert C.NearConfig(threshold=1.0).threshold == 1.0
    shards = _small_shards(tmp_path)
    out = tmp_path / "out"
    assert main(["dedup", str(shards), "-o", str(out), "--caption-dup-threshold", "0", "--runner=FnApiRunner"]) == 2
    assert not out.exists()
