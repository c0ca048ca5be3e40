"""Bilingual caption encoder: features, training on a synthetic parallel set, file format, config and CLI."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from bm6b import cli
from bm6b.filters import captions
from bm6b.filters.bilingual_encoder import (
    BilingualEncoder,
    FeatureSettings,
    TrainSettings,
    en_features,
    read_pairs_tsv,
    train_encoder,
    zh_features,
)
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.translate import TranslateChecker, load_encoder
from test_text_stages import caption_parser
from test_translate import load_harness
from text_data import raw_path

# A toy language pair in which every English content word has one Chinese counterpart.
SUBJECTS = {"dog": "狗", "cat": "猫", "man": "男人", "girl": "女孩", "horse": "马", "bird": "鸟"}
COLOURS = {"red": "红", "black": "黑", "white": "白", "brown": "棕", "blue": "蓝"}
ACTIONS = {"runs": "跑", "jumps": "跳", "sleeps": "睡", "sits": "坐", "plays": "玩"}
PLACES = {"snow": "雪地", "water": "水", "grass": "草地", "sand": "沙滩", "road": "路"}


def synthetic_caption(subject: str, colour: str, action: str, place: str) -> tuple[str, str]:
    en = f"A {colour} {subject} {action} on the {place} ."
    zh = f"一只{COLOURS[colour]}色的{SUBJECTS[subject]}在{PLACES[place]}上{ACTIONS[action]}。"
    return en, zh


def synthetic_groups(count: int, seed: int) -> list[list[tuple[str, str]]]:
    """Return ``count`` groups of 5 captions that share subject and place and differ in colour and action.

    Each group draws 5 distinct colour-action combinations out of 25, so every caption differs from
    the others of its group in at least one content word.
    """
    rng = random.Random(seed)
    groups = []
    for _ in range(count):
        subject = rng.choice(sorted(SUBJECTS))
        place = rng.choice(sorted(PLACES))
        combinations = rng.sample(list(itertools.product(sorted(COLOURS), sorted(ACTIONS))), 5)
        groups.append([synthetic_caption(subject, colour, action, place) for colour, action in combinations])
    return groups


def as_rows(groups: list[list[tuple[str, str]]], prefix: str) -> list[tuple[str, str, str]]:
    return [(f"{prefix}{g}", en, zh) for g, group in enumerate(groups) for en, zh in group]


SMALL = TrainSettings(dim=32, epochs=30, groups_per_batch=8, learning_rate=0.05, temperature=0.1)


@pytest.fixture(scope="module")
def trained() -> BilingualEncoder:
    return train_encoder(as_rows(synthetic_groups(120, seed=1), "train"), FeatureSettings(buckets=1 << 16), SMALL)


def test_zh_features_ngrams_and_t2s():
    settings = FeatureSettings(zh_max_ngram=2)
    # 貓 is the traditional form of 猫; NFKC maps the full-width Ｄｏｇ to "dog".
    assert zh_features("黑貓，Ｄｏｇ", settings) == ["黑", "猫", "黑猫", "#dog"]
    assert zh_features("黑貓", FeatureSettings(zh_max_ngram=1, traditional_to_simplified=False)) == ["黑", "貓"]


def test_en_features_stems_and_bigrams():
    assert en_features("Two dogs running", FeatureSettings()) == ["two", "dog", "run", "two dog", "dog run"]
    assert en_features("Two dogs running", FeatureSettings(en_bigrams=False)) == ["two", "dog", "run"]


def test_training_ranks_translation_first(trained):
    # Held-out groups drawn with another seed. Each zh caption of a group differs from the right
    # one in a colour or an action character, so an encoder that learned the word pairs ranks the
    # right translation first for every English caption: accuracy 1.0.
    held_out = synthetic_groups(30, seed=2)
    correct = 0
    for group in held_out:
        en_vectors = trained.encode([en for en, _ in group], "en")
        zh_vectors = trained.encode([zh for _, zh in group], "zh")
        similarity = en_vectors @ zh_vectors.T
        correct += int((similarity.argmax(axis=1) == np.arange(5)).sum())
    assert correct == 5 * len(held_out)


def test_training_deterministic():
    rows = as_rows(synthetic_groups(10, seed=3), "g")
    settings = TrainSettings(dim=8, epochs=2, groups_per_batch=4)
    first = train_encoder(rows, FeatureSettings(buckets=1 << 12), settings)
    second = train_encoder(rows, FeatureSettings(buckets=1 << 12), settings)
    assert np.array_equal(first.vectors["zh"], second.vectors["zh"])
    assert np.array_equal(first.vectors["en"], second.vectors["en"])


def test_encode_unit_norm_and_unknown_text(trained):
    vectors = trained.encode(["一只黑色的狗在雪地上跑。", "ㄅㄆㄇ"], "zh")
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert not vectors[1].any()  # no Han run and no Latin token: no features
    assert trained.cosine("ㄅㄆㄇ", "A black dog runs .") == 0.0


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "encoder.npz"
    trained.save(path)
    loaded = BilingualEncoder.load(path)
    assert loaded.settings == trained.settings
    texts = {"zh": ["一只黑色的狗在雪地上跑。", "马在路上睡"], "en": ["A black dog runs on the snow .", "horse"]}
    for language, language_texts in texts.items():
        assert np.array_equal(loaded.encode(language_texts, language), trained.encode(language_texts, language))


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder file not found"):
        BilingualEncoder.load(tmp_path / "absent.npz")


def test_load_malformed_files(trained, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        BilingualEncoder.load(garbage)

    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, header=np.array("{}"))
    with pytest.raises(ValueError, match="missing arrays"):
        BilingualEncoder.load(incomplete)

    arrays = {f"{language}_{kind}": getattr(trained, kind)[language]
              for language in ("zh", "en") for kind in ("buckets", "vectors")}
    header = {"format": "bm6b-bilingual-encoder", "version": 99, "settings": {}}
    future = tmp_path / "future.npz"
    np.savez(future, header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        BilingualEncoder.load(future)

    other = tmp_path / "other.npz"
    np.savez(other, header=np.array(json.dumps({**header, "format": "something-else"})), **arrays)
    with pytest.raises(ValueError, match="format is not"):
        BilingualEncoder.load(other)

    unsorted = tmp_path / "unsorted.npz"
    header = {"format": "bm6b-bilingual-encoder", "version": 1, "settings": {"buckets": 1 << 16}}
    np.savez(unsorted, header=np.array(json.dumps(header)), **{**arrays, "zh_buckets": arrays["zh_buckets"][::-1]})
    with pytest.raises(ValueError, match="sorted unique"):
        BilingualEncoder.load(unsorted)


def test_load_npy_truncated_and_nan_files(trained, tmp_path):
    single = tmp_path / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, np.arange(3))  # a .npy payload under an .npz name
    with pytest.raises(ValueError, match="single.npz: not a readable .npz archive"):
        BilingualEncoder.load(single)

    saved = tmp_path / "saved.npz"
    trained.save(saved)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.npz: not a readable .npz archive"):
        BilingualEncoder.load(truncated)

    with np.load(saved) as data:
        arrays = dict(data)
    arrays["en_vectors"] = arrays["en_vectors"].copy()
    arrays["en_vectors"][0, 0] = np.nan
    arrays["en_vectors"][1, 1] = np.inf
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, **arrays)
    with pytest.raises(ValueError, match="invalid en vectors: 2 values are NaN or infinite"):
        BilingualEncoder.load(damaged)


def test_load_invalid_settings(trained, tmp_path):
    arrays = {f"{language}_{kind}": getattr(trained, kind)[language]
              for language in ("zh", "en") for kind in ("buckets", "vectors")}
    for settings, message in (({"buckets": "many"}, "invalid buckets"), ({"colour": 1}, "invalid hashing settings"),
                              ({"buckets": 1 << 16, "zh_max_ngram": 9}, "invalid zh_max_ngram")):
        path = tmp_path / "settings.npz"
        header = {"format": "bm6b-bilingual-encoder", "version": 1, "settings": settings}
        np.savez(path, header=np.array(json.dumps(header)), **arrays)
        with pytest.raises(ValueError, match=message):
            BilingualEncoder.load(path)


def test_call_picks_table_by_script(trained):
    zh, en = "一只黑色的狗在雪地上跑。", "A black dog runs on the snow ."
    vectors = trained([zh, en])
    assert np.array_equal(vectors[0], trained.encode([zh], "zh")[0])
    assert np.array_equal(vectors[1], trained.encode([en], "en")[0])


def test_config_accepts_encoder_path(trained, tmp_path):
    path = tmp_path / "encoder.npz"
    trained.save(path)
    config = CaptionConfig().replace(embedding_model=str(path), weights={**CaptionConfig().weights, "embedding": 1.0})
    checker = TranslateChecker(config)
    zh, en = "一只黑色的狗在雪地上跑。", "A black dog runs on the snow ."
    expected = BilingualEncoder.load(path).cosine(zh, en)
    assert expected > 0.5
    assert checker.score(zh, en).subscores["embedding"] == pytest.approx(expected)


def test_config_missing_encoder_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        TranslateChecker(CaptionConfig().replace(embedding_model=str(tmp_path / "absent.npz")))


def test_read_pairs_tsv_rejects_bad_rows(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("img1\tA dog .\t一只狗。\n\nimg1\tA cat .\t一只猫。\n", encoding="utf-8")
    assert read_pairs_tsv(good) == [("img1", "A dog .", "一只狗。"), ("img1", "A cat .", "一只猫。")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("img1\tA dog .\t一只狗。\nimg2\tonly two fields\n", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid row 2"):
        read_pairs_tsv(bad)


def test_read_pairs_tsv_bom_crlf_and_encoding(tmp_path):
    text = "img1\tA dog .\t一只狗。\nimg1\tA cat .\t一只猫。\n"
    expected = [("img1", "A dog .", "一只狗。"), ("img1", "A cat .", "一只猫。")]
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(text.encode("utf-8-sig"))
    assert read_pairs_tsv(bom) == expected  # the first group_id is "img1", not "\ufeffimg1"
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    assert read_pairs_tsv(crlf) == expected
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes(b"img1\tA dog .\t\xe4\xb8\x80\n" + "img2\tA café .\tx\n".encode("latin-1"))
    with pytest.raises(ValueError, match="invalid row 2 in .*latin1.tsv: not UTF-8"):
        read_pairs_tsv(latin1)


def test_train_swapped_columns_and_skipped_pairs(caplog):
    swapped = [("img1", "一只狗在跑", "A dog runs ."), ("img2", "两只猫", "Two cats .")]
    with pytest.raises(ValueError, match="check the column order group_id, en, zh"):
        train_encoder(swapped, train=TrainSettings(dim=4, epochs=1))
    # "。。" has no Chinese character, so the second pair has no zh features.
    mixed = [("img1", "A dog runs .", "一只狗在跑"), ("img2", "Two cats .", "。。")]
    train_encoder(mixed, train=TrainSettings(dim=4, epochs=1))
    assert "skipped 1 of 2 pairs without features on one side" in caplog.text


def test_cli_train_text_encoder_output_folder(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("img1\tA dog .\t一只狗。\n", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    argv = ["train-text-encoder", "--pairs", str(tsv), "--output", str(folder), "--force", "--epochs", "1",
            "--dim", "8", "--no-progress"]
    assert cli.main(argv) == 2
    assert list(folder.iterdir()) == []


def test_cli_train_text_encoder(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    rows = as_rows(synthetic_groups(8, seed=4), "img")
    tsv.write_text("".join(f"{g}\t{en}\t{zh}\n" for g, en, zh in rows), encoding="utf-8")
    output = tmp_path / "encoder.npz"
    argv = ["train-text-encoder", "--pairs", str(tsv), "--output", str(output), "--epochs", "1", "--dim", "8",
            "--no-progress"]
    assert cli.main(argv) == 0
    assert BilingualEncoder.load(output).dim == 8
    assert cli.main(argv) == 2  # the output exists and --force is not given
    assert cli.main([*argv, "--force", "--temperature", "0"]) == 2  # invalid temperature
    missing = ["train-text-encoder", "--pairs", str(tmp_path / "absent.tsv"), "--output", str(tmp_path / "new.npz")]
    assert cli.main(missing) == 2
    assert not (tmp_path / "new.npz").exists()


@pytest.fixture(scope="module")
def flickr8k_encoder():
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    rows = harness.encoder_training_pairs(raw, "train")[:3000]  # the first 300 train images, zhb and zhg
    return train_encoder(rows, FeatureSettings(), TrainSettings(dim=64, epochs=5))


def test_real_flickr8k_small(flickr8k_encoder):
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    pairs = harness.build_pairs(raw, "test", limit=100)

    def cosines(kind):
        return np.array([flickr8k_encoder.cosine(zh, en) for zh, en in pairs[kind]])

    # Measured on 2026-12-05: ROC-AUC 0.99 against other images and 0.86 against zhm#(N+1).
    positives = cosines("human")
    assert harness.roc_auc(positives, cosines("other_image")) >= 0.95
    assert harness.roc_auc(positives, cosines("other_caption_same_image")) >= 0.8


def test_fit_embedding_only_keeps_dictionary(flickr8k_encoder, tmp_path):
    raw = raw_path("flickr8k-cn").parent
    harness = load_harness()
    path = tmp_path / "encoder.npz"
    flickr8k_encoder.save(path)
    config = CaptionConfig().replace(embedding_model=str(path))
    pairs = harness.build_pairs(raw, "test", limit=40)
    weights, bias, center = harness.fit_weights(pairs, config, ("human",), steps=300, embedding_only=True)
    assert set(weights) == {"embedding"}
    assert bias == CaptionConfig().translate_bias
    assert weights["embedding"] > 0.0  # a higher cosine must raise the score
    assert 0.0 < center < 1.0


def test_caption_options_set_encoder(trained, tmp_path):
    path = tmp_path / "encoder.npz"
    trained.save(path)
    args = caption_parser().parse_args(["--translate-check", "--translate-embedding-model", str(path),
                                        "--translate-embedding-weight", "12.5", "--translate-embedding-center", "0.6"])
    config = captions.caption_config_from_args(args)
    assert config.embedding_model == str(path)
    assert config.weights["embedding"] == 12.5
    assert config.embedding_center == 0.6
    zh, en = "一只黑色的狗在雪地上跑。", "A black dog runs on the snow ."
    result = TranslateChecker(config).score(zh, en)
    assert result.subscores["embedding"] == pytest.approx(trained.cosine(zh, en))


def test_caption_options_check_encoder_early(trained, tmp_path, caplog):
    # Workers load the encoder after the download, so bad encoder options must fail while the
    # config is built.
    def config_of(*argv):
        return captions.caption_config_from_args(caption_parser().parse_args(list(argv)))

    path = tmp_path / "encoder.npz"
    trained.save(path)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    check = ["--translate-check", "--translate-embedding-weight", "11.6", "--translate-embedding-model"]
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        config_of(*check, str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match="garbage.npz: not a readable .npz archive"):
        config_of(*check, str(garbage))
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_bm6b'"):
        config_of(*check, "no_such_module_bm6b:make")
    with pytest.raises(ValueError, match="module 'json' has no callable 'no_such_factory'"):
        config_of(*check, "json:no_such_factory")
    with pytest.raises(ValueError, match="invalid --translate-embedding-weight nan"):
        config_of("--translate-check", "--translate-embedding-weight", "nan", "--translate-embedding-model", str(path))
    with pytest.raises(ValueError, match="invalid --translate-embedding-center inf"):
        config_of("--translate-check", "--translate-embedding-center", "inf")
    assert config_of(*check, str(path)).embedding_model == str(path)
    assert caplog.text == ""

    config_of("--translate-embedding-model", str(path))
    assert "has no effect without --translate-check" in caplog.text
    caplog.clear()
    config_of("--translate-check", "--translate-embedding-model", str(path))
    assert "has no effect with --translate-embedding-weight 0.0" in caplog.text


def test_load_encoder_unknown_factory():
    with pytest.raises(ValueError, match="cannot import module"):
        load_encoder("no_such_module_bm6b:make")
    with pytest.raises(ValueError, match="has no callable"):
        load_encoder("json:no_such_factory")


def test_help_lists_train_text_encoder(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "train-text-encoder" in capsys.readouterr().out
