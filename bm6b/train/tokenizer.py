"""Text tokenizers for training: open_clip's SimpleTokenizer, or a bilingual BPE trained on the corpus.

open_clip's SimpleTokenizer (the OpenAI CLIP byte-level BPE, 49,408 tokens) spends about 2.5
tokens per Chinese character, so a 30-character Chinese caption nearly fills a 77-token context.
``train_bilingual_tokenizer`` learns a BPE vocabulary on the corpus' own zh and en captions with
the ``tokenizers`` library, so common Chinese words become single tokens.

Both tokenizers return open_clip's text layout: ``[SOT] tokens... [EOT] 0 0 ...`` in a
``LongTensor`` of shape (n, context_length). open_clip's text tower pools the feature at the
position of the largest token id, so the EOT token must have the largest id in the vocabulary:
the trained tokenizer adds it last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
SIMPLE = "simple"


class BilingualTokenizer:
    """A trained ``tokenizers`` BPE wrapped in open_clip's call interface."""

    def __init__(self, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        from tokenizers import Tokenizer

        self.path = str(path)
        try:
            self.tokenizer = Tokenizer.from_file(self.path)
        except Exception as err:  # tokenizers raises a bare Exception on unreadable files
            raise ValueError(f"cannot load tokenizer file {self.path}: {err}") from err
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (PAD, SOT, EOT) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer {self.path} lacks the special tokens {missing}; train it with `bm6b tokenizer train`")
        self.pad_id, self.sot_id, self.eot_id = vocab[PAD], vocab[SOT], vocab[EOT]
        self.vocab_size = self.tokenizer.get_vocab_size()
        if self.eot_id != self.vocab_size - 1:
            raise ValueError(f"tokenizer {self.path}: {EOT} must have the largest id ({self.vocab_size - 1}), got {self.eot_id}")
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        result = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.sot_id, *encoding.ids[: length - 2], self.eot_id]
            result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result


def load_tokenizer(spec: str, context_length: int = DEFAULT_CONTEXT_LENGTH):
    """Return the tokenizer named by ``spec``: ``simple`` (open_clip's) or a trained tokenizer JSON path."""
    if spec == SIMPLE:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer(context_length=context_length)
        tokenizer.vocab_size = len(tokenizer.encoder)
        return tokenizer
    if not Path(spec).is_file():
        raise FileNotFoundError(f"tokenizer file {spec} not found; pass 'simple' or a file from `bm6b tokenizer train`")
    return BilingualTokenizer(spec, context_length)


def train_bilingual_tokenizer(texts: Iterable[str], vocab_size: int, output: str | Path, min_frequency: int = 2) -> dict:
    """Train a BPE tokenizer on ``texts`` and save it as JSON; return a summary.

    Text is NFKC-normalized and lower-cased, split at whitespace (SentencePiece-style ``▁`` marks)
    and at punctuation. Chinese has no spaces, so BPE merges inside each run of Han characters
    learn the frequent words.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab size {vocab_size} is too small; use at least 300")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # EOT is added after training, as the largest id
        min_frequency=min_frequency,
        special_tokens=[PAD, UNK, SOT],
        show_progress=False,
    )
    count = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal count
        for item in items:
            count += 1
            yield item

    tokenizer.train_from_iterator(counted(texts), trainer=trainer)
    if count == 0:
        raise ValueError("no captions to train the tokenizer on")
    tokenizer.add_special_tokens([EOT])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output))
    summary = {"output": str(output), "texts": count, "vocab_size": tokenizer.get_vocab_size()}
    logger.info("trained tokenizer: %s", json.dumps(summary))
    return summary


def tokens_per_character(tokenizer, texts: list[str]) -> float:
    """Return the mean number of tokens (without SOT/EOT) per character over ``texts``."""
    tokens = chars = 0
    for text in texts:
        tokens += len(tokenizer.encode(text))
        chars += len(text)
    return tokens / max(chars, 1)
