"""A small zh/en caption encoder that users train on their own parallel captions.

Each caption becomes a bag of hashed features: Chinese character 1- and 2-grams (optionally
3-grams) after NFKC and OpenCC t2s, and English word stems with word bigrams. One embedding table
per language maps features to vectors, a caption vector is the mean of its feature vectors, L2
normalized. The cosine of a zh and an en vector scores how likely the two captions are
translations of each other.

Training (``train_encoder``, PyTorch on the CPU) is contrastive. The captions of one group (the
five captions of one image, say) are in the same batch, so the translations of the other captions
of the group are hard negatives next to the other groups of the batch. Inference
(``BilingualEncoder``) needs only numpy.

File format: one ``.npz`` (no pickled objects) with a JSON header under ``header`` (format name,
format version, hashing settings), the sorted bucket ids under ``zh_buckets`` and ``en_buckets``
and the embedding rows of those buckets under ``zh_vectors`` and ``en_vectors`` (float16). Buckets
that no training caption produced are not stored, and a feature that falls in one is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import random
import re
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from bm6b.filters import speedups
from bm6b.filters.translate import stem

logger = logging.getLogger(__name__)

FORMAT_NAME = "bm6b-bilingual-encoder"
FORMAT_VERSION = 1
LANGUAGES = ("zh", "en")
MAX_CACHED_FEATURES = 1 << 18  # per language (an estimated 25 MB); features past it are hashed on every use

_HAN_RUN_RE = re.compile("[\u3400-\u9fff\uf900-\ufaff]+")
_LATIN_TOKEN_RE = re.compile(r"[a-z0-9]+")
_EN_WORD_RE = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class FeatureSettings:
    """Feature hashing settings, stored in the file header so that training and inference agree."""

    buckets: int = 1 << 20  # hash space per language (CRC-32 modulo this)
    zh_max_ngram: int = 2  # character n-grams of Han runs, from 1 to this
    en_bigrams: bool = True  # add bigrams of adjacent English word stems
    traditional_to_simplified: bool = True  # OpenCC t2s before hashing, when opencc is installed

    def validate(self) -> None:
        # Bucket ids are stored as int32.
        if not isinstance(self.buckets, int) or not 2 <= self.buckets <= 2**31:
            raise ValueError(f"invalid buckets {self.buckets!r}: expected an integer from 2 to 2**31")
        if not isinstance(self.zh_max_ngram, int) or not 1 <= self.zh_max_ngram <= 4:
            raise ValueError(f"invalid zh_max_ngram {self.zh_max_ngram}: expected 1 to 4")


@functools.lru_cache(maxsize=1)
def _t2s_converter():
    try:
        import opencc
    except ImportError:
        logger.warning("opencc is not installed; traditional Chinese captions are hashed as written")
        return None
    return opencc.OpenCC("t2s")


def zh_features(text: str, settings: FeatureSettings) -> list[str]:
    """Return the features of a Chinese caption: character n-grams of each Han run, and Latin tokens."""
    text = unicodedata.normalize("NFKC", text).lower()
    if settings.traditional_to_simplified:
        converter = _t2s_converter()
        if converter is not None:
            text = converter.convert(text)
    features = []
    for run in _HAN_RUN_RE.findall(text):
        for size in range(1, settings.zh_max_ngram + 1):
            features.extend(run[i : i + size] for i in range(len(run) - size + 1))
    features.extend("#" + token for token in _LATIN_TOKEN_RE.findall(text))
    return features


def en_features(text: str, settings: FeatureSettings) -> list[str]:
    """Return the features of an English caption: word stems and, if set, bigrams of adjacent stems."""
    text = unicodedata.normalize("NFKC", text).lower()
    stems = [stem(word) for word in _EN_WORD_RE.findall(text)]
    features = list(stems)
    if settings.en_bigrams:
        features.extend(f"{a} {b}" for a, b in zip(stems, stems[1:]))
    return features


def feature_buckets(features: Iterable[str], buckets: int) -> list[int]:
    """Hash features to bucket ids with CRC-32, which is stable across processes (unlike ``hash``)."""
    return [zlib.crc32(feature.encode("utf-8")) % buckets for feature in features]


def caption_buckets(text: str, language: str, settings: FeatureSettings) -> list[int]:
    if language == "zh":
        features = zh_features(text, settings)
    elif language == "en":
        features = en_features(text, settings)
    else:
        raise ValueError(f"invalid language {language!r}: expected 'zh' or 'en'")
    return feature_buckets(features, settings.buckets)


class BilingualEncoder:
    """A trained encoder: one table of feature vectors per language, looked up with numpy."""

    def __init__(self, settings: FeatureSettings, buckets: dict[str, np.ndarray], vectors: dict[str, np.ndarray]):
        settings.validate()
        self.settings = settings
        self.buckets = {}
        self.vectors = {}
        for language in LANGUAGES:
            ids = np.asarray(buckets[language], dtype=np.int64)
            table = np.asarray(vectors[language], dtype=np.float32)
            if ids.ndim != 1 or table.ndim != 2 or len(ids) != len(table):
                raise ValueError(f"invalid {language} table: {ids.shape} bucket ids for {table.shape} vectors")
            if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= settings.buckets):
                raise ValueError(f"invalid {language} bucket ids: expected sorted unique ids below {settings.buckets}")
            if not np.all(np.isfinite(table)):
                raise ValueError(f"invalid {language} vectors: {int(np.sum(~np.isfinite(table)))} values are NaN or infinite")
            self.buckets[language] = ids
            self.vectors[language] = np.ascontiguousarray(table)
        dims = {table.shape[1] for table in self.vectors.values()}
        if len(dims) != 1:
            raise ValueError(f"invalid encoder: the zh and en vectors differ in dimension ({sorted(dims)})")
        self.dim = dims.pop()
        # Table row of each stored bucket id.
        self._rows = {language: {int(b): i for i, b in enumerate(self.buckets[language])} for language in LANGUAGES}
        # Table rows per feature string, filled on first use, so a repeated feature skips CRC-32.
        self._feature_rows: dict[str, dict[str, int]] = {language: {} for language in LANGUAGES}
        # The compiled feature extraction and row sum, which return the same rows and bits (see speedups).
        module = speedups.compiled("_translate_fast")
        self._fast_rows = module.encoder_rows if module is not None else None
        self._fast_sum = module.summed_rows if module is not None else None
        self._fast_cosine = module.encoder_cosine if module is not None else None

    def _table_rows(self, text: str, language: str) -> list[int]:
        """Return the table rows of the features of ``text`` that fall in a stored bucket."""
        if self._fast_rows is not None and type(text) is str and type(language) is str:
            return self._fast_rows(self, text, language)
        return self._table_rows_python(text, language)

    def _table_rows_python(self, text: str, language: str) -> list[int]:
        """Return ``_table_rows`` computed in Python, the reference for the compiled version."""
        if language == "zh":
            features = zh_features(text, self.settings)
        elif language == "en":
            features = en_features(text, self.settings)
        else:
            raise ValueError(f"invalid language {language!r}: expected 'zh' or 'en'")
        cache = self._feature_rows[language]
        rows = []
        for feature in features:
            row = cache.get(feature)
            if row is None:
                bucket = zlib.crc32(feature.encode("utf-8")) % self.settings.buckets
                row = self._rows[language].get(bucket, -1)
                if len(cache) < MAX_CACHED_FEATURES:
                    cache[feature] = row
            if row >= 0:
                rows.append(row)
        return rows

    def _summed(self, text: str, language: str) -> np.ndarray | None:
        """Return the sum of the feature vectors of ``text`` (the mean up to scale), or None without any."""
        rows = self._table_rows(text, language)
        if not rows:
            return None
        if self._fast_sum is not None:
            return self._fast_sum(self.vectors[language], rows)
        return np.add.reduce(self.vectors[language].take(rows, axis=0), axis=0)

    def encode(self, texts: Sequence[str], language: str) -> np.ndarray:
        """Return one L2-normalized float32 row per text; a text without known features gives zeros."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            vector = self._summed(text, language)
            if vector is None:
                continue
            norm = math.sqrt(float(vector @ vector))
            if norm > 0.0:
                out[i] = vector / norm
        return out

    def cosine(self, zh: str, en: str) -> float:
        """Return the cosine of the zh caption's and the en caption's vectors, 0 when either has none."""
        if self._fast_cosine is not None and type(zh) is str and type(en) is str:
            return self._fast_cosine(self, zh, en)
        return self._cosine_python(zh, en)

    def _cosine_python(self, zh: str, en: str) -> float:
        """Return ``cosine`` without the compiled cosine; ``_summed`` still uses compiled rows and sums where built."""
        a = self._summed(zh, "zh")
        b = self._summed(en, "en")
        if a is None or b is None:
            return 0.0
        norms = float(a @ a) * float(b @ b)
        return float(a @ b) / math.sqrt(norms) if norms > 0.0 else 0.0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts of unknown language: a text with a Han character goes to the zh table."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            language = "zh" if _HAN_RUN_RE.search(text) else "en"
            out[i] = self.encode([text], language)[0]
        return out

    def save(self, path: str | pathlib.Path) -> None:
        """Write the encoder to ``path`` as ``.npz`` (see the module docstring), whatever the name ends in."""
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": self.dim,
                  "settings": dataclasses.asdict(self.settings)}
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                header=np.array(json.dumps(header)),
                zh_buckets=self.buckets["zh"].astype(np.int32),
                en_buckets=self.buckets["en"].astype(np.int32),
                zh_vectors=self.vectors["zh"].astype(np.float16),
                en_vectors=self.vectors["en"].astype(np.float16),
            )

    @classmethod
    def load(cls, path: str | pathlib.Path) -> BilingualEncoder:
        """Read a file written by ``save``; raise FileNotFoundError or ValueError naming the path."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                # np.load returns a bare array for a .npy file, whatever the file name ends in.
                raise ValueError("it contains a single array, as np.save writes")
            with data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise ValueError(f"invalid encoder file {path}: not a readable .npz archive ({err})") from err
        missing = {"header", "zh_buckets", "en_buckets", "zh_vectors", "en_vectors"} - set(arrays)
        if missing:
            raise ValueError(f"invalid encoder file {path}: missing arrays {sorted(missing)}")
        try:
            header = json.loads(str(arrays["header"]))
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid encoder file {path}: the header is not JSON ({err})") from err
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ValueError(f"invalid encoder file {path}: format is not {FORMAT_NAME!r}")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported encoder file {path}: format version {header.get('version')!r}, "
                             f"this bm6b reads version {FORMAT_VERSION}")
        try:
            settings = FeatureSettings(**header["settings"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"invalid encoder file {path}: invalid hashing settings ({err})") from err
        try:
            return cls(settings,
                       {language: arrays[f"{language}_buckets"] for language in LANGUAGES},
                       {language: arrays[f"{language}_vectors"] for language in LANGUAGES})
        except ValueError as err:
            raise ValueError(f"invalid encoder file {path}: {err}") from err


@dataclass(frozen=True)
class TrainSettings:
    """Options of ``train_encoder``."""

    dim: int = 128  # embedding dimension
    epochs: int = 10
    groups_per_batch: int = 64  # groups (images) per batch; every caption of a group is in the batch
    learning_rate: float = 0.01  # SparseAdam
    temperature: float = 0.1  # softmax temperature of the contrastive loss
    seed: int = 0

    def validate(self) -> None:
        for name in ("dim", "epochs", "groups_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}: expected at least 1")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if not (value > 0.0 and math.isfinite(value)):
                raise ValueError(f"invalid {name} {value}: expected a positive number")


def read_pairs_tsv(path: str | pathlib.Path) -> list[tuple[str, str, str]]:
    """Read (group_id, en, zh) rows from a UTF-8 TSV without a header; blank lines are skipped.

    A UTF-8 byte order mark at the start is dropped, so it does not end up in the first group_id.
    Raises ValueError naming the path and row for a row that is not UTF-8 or has the wrong fields.
    """
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"invalid row {number} in {path}: not UTF-8 ({err.reason} at byte {err.start} "
                                 "of the row); save the file as UTF-8") from err
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3 or not all(field.strip() for field in fields):
                raise ValueError(f"invalid row {number} in {path}: expected 3 non-empty tab-separated fields "
                                 f"(group_id, en, zh), got {len(fields)}")
            rows.append((fields[0], fields[1], fields[2]))
    if not rows:
        raise ValueError(f"no pairs in {path}: expected rows of group_id, en, zh separated by tabs")
    return rows


def _bag_tensors(bags: list[list[int]]):
    import torch

    lengths = [len(bag) for bag in bags]
    offsets = np.zeros(len(bags), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.fromiter((row for bag in bags for row in bag), dtype=np.int64, count=sum(lengths))
    return torch.from_numpy(flat), torch.from_numpy(offsets)


def train_encoder(pairs: Sequence[tuple[str, str, str]], settings: FeatureSettings | None = None,
                  train: TrainSettings | None = None, progress: bool = False) -> BilingualEncoder:
    """Train an encoder on (group_id, en, zh) pairs with a symmetric InfoNCE loss.

    Batches are built from whole groups, so the other pairs of a group are negatives in every
    batch that contains it. An English caption listed with several translations (rows with the same
    group_id and en) counts each translation as a positive: the loss target is spread over them.
    Sets torch to one CPU thread for the whole process, and is deterministic for a given seed.
    """
    import torch

    settings = settings or FeatureSettings()
    train = train or TrainSettings()
    settings.validate()
    train.validate()
    if not pairs:
        raise ValueError("no training pairs")
    torch.set_num_threads(1)
    torch.manual_seed(train.seed)
    started = time.process_time()

    # Map every bucket seen in training to a row of a compact table.
    row_of: dict[str, dict[int, int]] = {"zh": {}, "en": {}}
    groups: dict[str, list[int]] = {}
    zh_bags, en_bags, en_ids = [], [], []
    en_index: dict[tuple[str, str], int] = {}
    for group, en, zh in pairs:
        zh_rows = [row_of["zh"].setdefault(b, len(row_of["zh"])) for b in caption_buckets(zh, "zh", settings)]
        en_rows = [row_of["en"].setdefault(b, len(row_of["en"])) for b in caption_buckets(en, "en", settings)]
        if not zh_rows or not en_rows:
            continue
        groups.setdefault(group, []).append(len(zh_bags))
        zh_bags.append(zh_rows)
        en_bags.append(en_rows)
        en_ids.append(en_index.setdefault((group, en), len(en_index)))
    if not zh_bags:
        raise ValueError("no training pair has features on both sides: the en field needs Latin letters or "
                         "digits and the zh field Chinese characters; check the column order group_id, en, zh")
    if len(zh_bags) < len(pairs):
        logger.warning("skipped %d of %d pairs without features on one side (no Chinese characters in zh, "
                       "or no Latin letters or digits in en)", len(pairs) - len(zh_bags), len(pairs))
    logger.info("training on %d pairs in %d groups; %d zh and %d en buckets in use",
                len(zh_bags), len(groups), len(row_of["zh"]), len(row_of["en"]))

    # Sparse gradients: a step updates only the rows of the features in its batch, so its cost
    # does not grow with the table size.
    zh_table = torch.nn.EmbeddingBag(len(row_of["zh"]), train.dim, mode="mean", sparse=True)
    en_table = torch.nn.EmbeddingBag(len(row_of["en"]), train.dim, mode="mean", sparse=True)
    for table in (zh_table, en_table):
        torch.nn.init.normal_(table.weight, std=0.1)
    optimizer = torch.optim.SparseAdam([*zh_table.parameters(), *en_table.parameters()], lr=train.learning_rate)
    en_ids_array = np.array(en_ids)

    rng = random.Random(train.seed)
    group_names = sorted(groups)
    batches_per_epoch = math.ceil(len(group_names) / train.groups_per_batch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=train.epochs * batches_per_epoch, desc="train-text-encoder", dynamic_ncols=True)
    for epoch in range(train.epochs):
        rng.shuffle(group_names)
        total_loss = 0.0
        for start in range(0, len(group_names), train.groups_per_batch):
            batch = [i for name in group_names[start : start + train.groups_per_batch] for i in groups[name]]
            zh_flat, zh_offsets = _bag_tensors([zh_bags[i] for i in batch])
            en_flat, en_offsets = _bag_tensors([en_bags[i] for i in batch])
            zh_vectors = torch.nn.functional.normalize(zh_table(zh_flat, zh_offsets), dim=1)
            en_vectors = torch.nn.functional.normalize(en_table(en_flat, en_offsets), dim=1)
            logits = en_vectors @ zh_vectors.T / train.temperature
            # Row i's positives are every zh in the batch paired with the same English caption.
            ids = torch.from_numpy(en_ids_array[batch])
            target = (ids[:, None] == ids[None, :]).float()
            loss_en = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            loss_zh = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
            loss = (loss_en + loss_zh) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            if bar is not None:
                bar.update(1)
        mean_loss = total_loss / batches_per_epoch
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        logger.log(logging.DEBUG if bar is not None else logging.INFO,
                   "epoch %d/%d: mean loss %.4f", epoch + 1, train.epochs, mean_loss)
    if bar is not None:
        bar.close()
    logger.info("trained in %.1f s of CPU time", time.process_time() - started)

    buckets, vectors = {}, {}
    for language, table in (("zh", zh_table), ("en", en_table)):
        ids = np.array(list(row_of[language]), dtype=np.int64)
        order = np.argsort(ids)
        buckets[language] = ids[order]
        rows = table.weight.detach().numpy()[np.array(list(row_of[language].values()))[order]]
        # Round to float16 as ``save`` stores them, so a saved and reloaded encoder gives the same vectors.
        vectors[language] = rows.astype(np.float16).astype(np.float32)
    return BilingualEncoder(settings, buckets, vectors)
