"""The bilingual BPE tokenizer: open_clip's token layout, and fewer tokens per Chinese character."""

from __future__ import annotations

import pytest
import torch

from bm6b.train.tokenizer import (
    EOT,
    SOT,
    BilingualTokenizer,
    load_tokenizer,
    tokens_per_character,
    train_bilingual_tokenizer,
)

CAPTIONS = [
    "一只黑色的狗在草地上奔跑。",
    "两个孩子在海边玩沙子。",
    "一个穿红色衣服的女人在街上走。",
    "a black dog runs on the grass .",
    "two children play with sand at the beach .",
    "a woman in a red dress walks down the street .",
] * 20


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    summary = train_bilingual_tokenizer(CAPTIONS, vocab_size=400, output=path)
    assert summary["texts"] == len(CAPTIONS)
    return path


def test_eot_has_largest_id(tokenizer_path):
    tokenizer = BilingualTokenizer(tokenizer_path, context_length=16)
    assert tokenizer.eot_id == tokenizer.vocab_size - 1
    assert tokenizer.tokenizer.token_to_id(EOT) == tokenizer.vocab_size - 1


def test_layout_matches_open_clip(tokenizer_path):
    tokenizer = BilingualTokenizer(tokenizer_path, context_length=16)
    tokens = tokenizer(["a black dog", "一只黑色的狗"])
    assert tokens.shape == (2, 16)
    assert tokens.dtype == torch.long
    for row in tokens:
        assert row[0].item() == tokenizer.tokenizer.token_to_id(SOT)
        end = row.argmax().item()  # open_clip pools the text feature at the largest id
        assert row[end].item() == tokenizer.eot_id
        assert (row[end + 1 :] == tokenizer.pad_id).all()


def test_long_caption_is_truncated_with_eot(tokenizer_path):
    tokenizer = BilingualTokenizer(tokenizer_path, context_length=8)
    row = tokenizer("a black dog runs on the grass with two children at the beach")[0]
    assert row[-1].item() == tokenizer.eot_id


def test_frequent_chinese_words_merge(tokenizer_path):
    tokenizer = BilingualTokenizer(tokenizer_path)
    text = "一只黑色的狗在草地上奔跑"
    assert len(tokenizer.encode(text)) < len(text) / 2


def test_bad_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        BilingualTokenizer(broken)


def test_empty_corpus_raises(tmp_path):
    with pytest.raises(ValueError, match="no captions"):
        train_bilingual_tokenizer([], vocab_size=400, output=tmp_path / "t.json")


def _flickr_captions(folder, name, ids=None):
    captions = []
    for line in (folder / name).read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition(" ")
        if caption and (ids is None or key.split(".jpg")[0] in ids):
            captions.append(caption)
    return captions


def test_real_captions_fewer_tokens_per_character(shared_raw, tmp_path):
    folder = shared_raw / "flickr8k-cn"
    train_ids = set((folder / "flickr8ktrain.txt").read_text().split())
    corpus = _flickr_captions(folder, "flickr8kzhc.caption.txt", train_ids)
    corpus += _flickr_captions(folder, "flickr8kenc.caption.txt", train_ids)
    train_bilingual_tokenizer(corpus, vocab_size=8000, output=tmp_path / "flickr.json")
    bilingual = load_tokenizer(str(tmp_path / "flickr.json"))
    simple = load_tokenizer("simple")

    # Held-out Chinese: human translations of the test split's English captions.
    held_out_zh = _flickr_captions(folder, "flickr8kzhmtest.captions.txt")[:1000]
    simple_rate = tokens_per_character(simple, held_out_zh)
    bilingual_rate = tokens_per_character(bilingual, held_out_zh)
    assert simple_rate > 1.5
    assert bilingual_rate < 0.9
    assert bilingual_rate < simple_rate / 2
