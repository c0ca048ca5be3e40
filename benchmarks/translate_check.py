"""Evaluate the translate-check scorer on Flickr8k-CN human and machine translations.

Usage: python benchmarks/translate_check.py [--raw ../shared/data/raw] [--split test] [--limit N]
       [--half fit|held-out] [--fit] [--weights FILE] [--encoder FILE] [--speed N]
       python benchmarks/translate_check.py --train-encoder FILE [--epochs N] [--dim N]

Pairs, all built from the chosen split's images (test has the 5,000 human translations):

* positives ``human``: English caption ``enc#N`` with its human translation ``zhm#N`` (test only);
* positives ``mt_baidu`` / ``mt_google``: ``enc#N`` with the machine translations ``zhb#N`` / ``zhg#N``;
* hard negatives ``zhc_same_image``: ``enc#N`` with the independently written Chinese caption
  ``zhc#N`` of the same image;
* hard negatives ``other_caption_same_image``: ``enc#N`` with the translation of another caption of
  the same image (``zhm#(N+1) mod 5``, or ``zhb`` outside the test split);
* easy negatives ``other_image``: ``enc#N`` with the translation of caption N of another image.

For each negative kind the report gives the ROC-AUC of the combined score and of each sub-score.
It also gives precision, recall and F1 of the positive class at the configured threshold, computed
on the positives (``human`` on the test split) together with that kind's negatives.

``--half`` keeps one of two fixed halves of the split's images (by the parity of the CRC-32 of the
image id), so weights can be fitted on the human translations of one half of the test images and
evaluated on the other. ``--speed N`` times ``TranslateChecker.score`` alone (compiled when built),
next to the pure-Python reference scorer, in process CPU time, on the first N English captions with
their Baidu translations (``enc#N`` / ``zhb#N``, all images).

``--train-encoder FILE`` trains a ``BilingualEncoder`` on the train split's machine translations
only (``enc#N`` with ``zhb#N`` and with ``zhg#N``, grouped by image, so the translations of the
other captions of an image are its hard negatives) and saves it. ``--encoder FILE`` adds its
cosine as the ``embedding`` sub-score; its weight and ``embedding_center`` come from ``--weights``
(a ``--fit --encoder FILE`` output), so fit them on images the encoder was not trained on (the val
split, or ``--half fit`` of the test split).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import time
import zlib

import numpy as np

from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.text_normalize import normalize_caption
from bm6b.filters.translate import AGREEMENT_SUBSCORES, TranslateChecker

DEFAULT_RAW = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"
FILES = {
    "enc": "flickr8kenc.caption.txt",
    "zhc": "flickr8kzhc.caption.txt",
    "zhm": "flickr8kzhmtest.captions.txt",
    "zhb": "flickr8kzhb.caption.txt",
    "zhg": "flickr8kzhg.caption.txt",
}
NEGATIVE_KINDS = ("zhc_same_image", "other_caption_same_image", "other_image")
SUBSCORES = ("en_coverage", "zh_coverage", "coverage_min", "en_unmatched", "zh_unmatched", "length", "tokens",
             "colours", "counts", "embedding")


def read_captions(raw: pathlib.Path, kind: str) -> dict[tuple[str, int], str]:
    captions = {}
    with open(raw / "flickr8k-cn" / FILES[kind], encoding="utf-8") as f:
        for line in f:
            key, _, text = line.rstrip("\n").partition(" ")
            image, _, index = key.split("#")
            captions[(image, int(index))] = text
    return captions


def read_split(raw: pathlib.Path, split: str) -> list[str]:
    lines = (raw / "flickr8k-cn" / f"flickr8k{split}.txt").read_text().split()
    return [line + ".jpg" for line in lines]


HALVES = ("fit", "held-out")


def image_half(image: str) -> str:
    """Return the half (``fit`` or ``held-out``) of an image, from the parity of its id's CRC-32."""
    return HALVES[zlib.crc32(image.encode()) % 2]


def build_pairs(raw: pathlib.Path, split: str = "test", limit: int | None = None,
                seed: int = 0, half: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Return (zh, en) pairs per kind; ``limit`` keeps the first N images of the split.

    ``half`` keeps only the images of that half (see ``image_half``), before ``limit`` applies.
    Negatives of another image are drawn from the kept images only.
    """
    images = read_split(raw, split)
    if half is not None:
        images = [image for image in images if image_half(image) == half]
    if limit is not None:
        images = images[:limit]
    enc = read_captions(raw, "enc")
    zhc = read_captions(raw, "zhc")
    zhb = read_captions(raw, "zhb")
    zhg = read_captions(raw, "zhg")
    translation = read_captions(raw, "zhm") if split == "test" else zhb

    rng = random.Random(seed)
    pairs: dict[str, list[tuple[str, str]]] = {
        "human": [], "mt_baidu": [], "mt_google": [], **{kind: [] for kind in NEGATIVE_KINDS}
    }
    for image in images:
        for n in range(5):
            en = enc.get((image, n))
            if en is None:
                continue
            if split == "test" and (image, n) in translation:
                pairs["human"].append((translation[(image, n)], en))
            if (image, n) in zhb:
                pairs["mt_baidu"].append((zhb[(image, n)], en))
            if (image, n) in zhg:
                pairs["mt_google"].append((zhg[(image, n)], en))
            if (image, n) in zhc:
                pairs["zhc_same_image"].append((zhc[(image, n)], en))
            other = translation.get((image, (n + 1) % 5))
            if other is not None:
                pairs["other_caption_same_image"].append((other, en))
            other_image = images[rng.randrange(len(images))]
            while other_image == image and len(images) > 1:
                other_image = images[rng.randrange(len(images))]
            far = translation.get((other_image, n))
            if far is not None:
                pairs["other_image"].append((far, en))
    return pairs


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic, ties counted half."""
    scores = np.concatenate([positives, negatives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall_f1(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> tuple[float, float, float]:
    tp = float((positives >= threshold).sum())
    fp = float((negatives >= threshold).sum())
    fn = float(len(positives) - tp)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_pairs(checker: TranslateChecker, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    combined = np.empty(len(pairs))
    subscores: dict[str, list[float]] = {}
    for i, (zh, en) in enumerate(pairs):
        result = checker.score(normalize_caption(zh), normalize_caption(en))
        combined[i] = result.combined
        for name in SUBSCORES:
            subscores.setdefault(name, []).append(result.subscores.get(name, np.nan))
    return combined, {name: np.array(values) for name, values in subscores.items()}


def encoder_training_pairs(raw: pathlib.Path, split: str = "train") -> list[tuple[str, str, str]]:
    """Return (image, ``enc#N``, ``zhb#N``) and (image, ``enc#N``, ``zhg#N``) rows of the split's images."""
    enc = read_captions(raw, "enc")
    translations = (read_captions(raw, "zhb"), read_captions(raw, "zhg"))
    rows = []
    for image in read_split(raw, split):
        for n in range(5):
            en = enc.get((image, n))
            if en is None:
                continue
            rows.extend((image, en, zh[(image, n)]) for zh in translations if (image, n) in zh)
    return rows


def evaluate(pairs: dict[str, list[tuple[str, str]]], config: CaptionConfig,
             positive_kind: str = "human") -> dict[str, dict]:
    """Score every kind and return the report dict (see the module docstring)."""
    checker = TranslateChecker(config)
    scored = {kind: score_pairs(checker, kind_pairs) for kind, kind_pairs in pairs.items() if kind_pairs}
    positives, positive_subscores = scored[positive_kind]
    threshold = config.translate_threshold

    report: dict[str, dict] = {"threshold": threshold, "positives": positive_kind, "kinds": {}}
    for kind, (values, subscores) in scored.items():
        entry: dict = {"n": len(values), "mean": float(values.mean()),
                       "accept_rate": float((values >= threshold).mean())}
        if kind in NEGATIVE_KINDS:
            precision, recall, f1 = precision_recall_f1(positives, values, threshold)
            entry.update(auc=roc_auc(positives, values), precision=precision, recall=recall, f1=f1)
            entry["subscore_auc"] = {}
            for name, sub in subscores.items():
                if np.isnan(sub).all() and np.isnan(positive_subscores[name]).all():
                    continue
                pos = np.nan_to_num(positive_subscores[name], nan=0.5)
                neg = np.nan_to_num(sub, nan=0.5)
                entry["subscore_auc"][name] = roc_auc(pos, neg)
        report["kinds"][kind] = entry
    return report


FIT_FEATURES = ("en_coverage", "zh_coverage", "coverage_min", "en_unmatched", "zh_unmatched", "length", "colours",
                "counts")


def fit_value(subscores: dict[str, float], name: str, center: float = 0.5) -> float:
    """Return a sub-score as it enters the logistic model.

    Agreement sub-scores enter as value - 1 and ``embedding`` as value - ``center``.
    """
    if name in AGREEMENT_SUBSCORES:
        return subscores.get(name, 1.0) - 1.0
    if name == "embedding":
        return subscores.get(name, 0.0) - center
    return subscores.get(name, 0.0)


def fit_weights(pairs: dict[str, list[tuple[str, str]]], config: CaptionConfig,
                positive_kinds: tuple[str, ...] = ("mt_baidu", "mt_google"),
                steps: int = 4000, l2: float = 1e-3,
                embedding_only: bool = False) -> tuple[dict[str, float], float, float]:
    """Fit the logistic weights and bias of FIT_FEATURES by gradient descent, classes balanced.

    The positives are ``positive_kinds`` and the negatives all three NEGATIVE_KINDS. With an
    encoder configured, ``embedding`` is fitted too, centred on the midpoint of the mean positive
    and mean negative cosine. Returns the weights, the bias and that centre.

    ``embedding_only`` keeps the dictionary weights and the bias of ``config`` and fits only the
    ``embedding`` weight and ``embedding_center``: the two values a pipeline run sets with
    ``--translate-embedding-weight`` and ``--translate-embedding-center``. Pairs that a hard rule
    rejects are left out of that fit, because the encoder cannot change their score.
    """
    names = FIT_FEATURES
    if config.embedding_model:
        names = (*FIT_FEATURES, "embedding")
        config = config.replace(weights={**config.weights, "embedding": 1.0})
    elif embedding_only:
        raise ValueError("embedding_only needs an encoder (embedding_model)")
    checker = TranslateChecker(config)

    def subscores_of(kind_pairs):
        results = (checker.score(normalize_caption(zh), normalize_caption(en)) for zh, en in kind_pairs)
        return [result.subscores for result in results if not (embedding_only and result.rule)]

    positive_rows = [row for kind in positive_kinds for row in subscores_of(pairs[kind])]
    negative_rows = [row for kind in NEGATIVE_KINDS for row in subscores_of(pairs[kind])]
    center = config.embedding_center
    if "embedding" in names:
        mean_positive = statistics.fmean(row.get("embedding", 0.0) for row in positive_rows)
        mean_negative = statistics.fmean(row.get("embedding", 0.0) for row in negative_rows)
        center = round((mean_positive + mean_negative) / 2, 3)
    offset = 0.0
    if embedding_only:
        # The dictionary part of each logit stays fixed, so it enters the descent as an offset.
        def dictionary_logit(row: dict[str, float]) -> float:
            terms = (config.weights.get(name, 0.0) * fit_value(row, name) for name in row if name != "embedding")
            return config.translate_bias + sum(terms)

        offset = np.array([dictionary_logit(row) for row in positive_rows + negative_rows])
        names = ("embedding",)
    positives = np.array([[fit_value(row, name, center) for name in names] for row in positive_rows])
    negatives = np.array([[fit_value(row, name, center) for name in names] for row in negative_rows])
    x = np.vstack([positives, negatives])
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    sample_weight = np.where(y == 1, len(y) / (2 * len(positives)), len(y) / (2 * len(negatives)))

    # Standardize for a well-conditioned descent, then map the weights back to raw sub-scores.
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mean) / std
    w = np.zeros(z.shape[1])
    b = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b + offset)))
        gradient = (p - y) * sample_weight
        w -= 0.5 * (z.T @ gradient / len(y) + l2 * w)
        b -= 0.5 * gradient.mean()

    raw_weights = w / std
    raw_bias = b - float((w * mean / std).sum())
    if embedding_only:
        # weight * (cosine - center) + raw_bias = weight * (cosine - new_center) moves the bias into the centre.
        weight = float(raw_weights[0])
        new_center = center - raw_bias / weight
        return {"embedding": round(weight, 3)}, config.translate_bias, round(new_center, 4)
    return {name: round(float(v), 3) for name, v in zip(names, raw_weights)}, round(raw_bias, 3), center


def read_translation_pairs(raw: pathlib.Path, limit: int) -> list[tuple[str, str]]:
    """Return the first ``limit`` (``zhb#N``, ``enc#N``) pairs in the order of the English file."""
    enc = read_captions(raw, "enc")
    zhb = read_captions(raw, "zhb")
    return [(zhb[key], en) for key, en in enc.items() if key in zhb][:limit]


def time_scorer(checker: TranslateChecker, pairs: list[tuple[str, str]], repeats: int = 3) -> dict:
    """Time ``checker.score`` on normalized pairs, in process CPU microseconds per pair.

    Peers in the same run, taking turns with it: the pure-Python reference scorer
    (``_score_python``, the same scores) and ``CedictIndex.words_in`` on the zh side alone, the
    dictionary lookup of the Python scorer. One untimed pass first fills the per-word caches.
    """
    normalized = [(normalize_caption(zh), normalize_caption(en)) for zh, en in pairs]

    # Results are dropped at once, as in the pipeline: a list of 20,000 scores would make the
    # garbage collector scan the dictionary's objects and bias whichever loop happens to run then.
    def score_all(score):
        for zh, en in normalized:
            score(zh, en)

    def words_in_all():
        for zh, _ in normalized:
            checker.index.words_in(zh)

    loops = {
        "score": lambda: score_all(checker.score),
        "python_score": lambda: score_all(checker._score_python),
        "words_in": words_in_all,
    }
    for loop in loops.values():
        loop()

    runs: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            started = time.process_time()
            loop()
            runs[name].append((time.process_time() - started) / len(normalized) * 1e6)
    return {
        "pairs": len(normalized),
        "compiled": checker._fast is not None,
        "score_us_per_pair": round(statistics.median(runs["score"]), 2),
        "python_score_us_per_pair": round(statistics.median(runs["python_score"]), 2),
        "words_in_us_per_pair": round(statistics.median(runs["words_in"]), 2),
        "runs_score_us": [round(value, 2) for value in runs["score"]],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def format_report(report: dict) -> str:
    lines = [
        f"threshold {report['threshold']}, positives: {report['positives']}",
        "| pairs | n | ROC-AUC | precision | recall | F1 | accepted | AUC " + " / ".join(SUBSCORES) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, entry in report["kinds"].items():
        if "auc" in entry:
            subs = " / ".join(f"{entry['subscore_auc'][name]:.3f}" if name in entry["subscore_auc"] else "-"
                              for name in SUBSCORES)
            lines.append(
                f"| {kind} | {entry['n']} | {entry['auc']:.4f} | {entry['precision']:.4f} | {entry['recall']:.4f} "
                f"| {entry['f1']:.4f} | {entry['accept_rate']:.4f} | {subs} |"
            )
        else:
            lines.append(f"| {kind} (positive) | {entry['n']} | | | | | {entry['accept_rate']:.4f} | |")
    return "\n".join(lines)


def train_encoder_main(args: argparse.Namespace) -> int:
    """Train and save an encoder on the train split's MT pairs; print its size and training CPU time."""
    from bm6b.filters.bilingual_encoder import FeatureSettings, TrainSettings, train_encoder

    rows = encoder_training_pairs(args.raw, "train")
    started = time.process_time()
    encoder = train_encoder(rows, FeatureSettings(zh_max_ngram=args.zh_max_ngram),
                            TrainSettings(dim=args.dim, epochs=args.epochs))
    cpu_s = time.process_time() - started
    encoder.save(args.train_encoder)
    print(json.dumps({"pairs": len(rows), "train_cpu_s": round(cpu_s, 1), "bytes": args.train_encoder.stat().st_size,
                      "zh_rows": len(encoder.buckets["zh"]), "en_rows": len(encoder.buckets["en"]),
                      "load_average_1min": round(os.getloadavg()[0], 2)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=pathlib.Path, default=DEFAULT_RAW, help="folder with the real data sets")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="Flickr8k split whose images build the pairs")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    parser.add_argument("--positives", default=None,
                        help="positive kind for the metrics: human (default on test) or mt_baidu / mt_google")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--half", choices=HALVES, default=None,
                        help="keep only this half of the split's images (split by the CRC-32 of the image id)")
    parser.add_argument("--fit", action="store_true",
                        help="fit the logistic weights on this split's pairs and print them; the positives are the "
                             "human translations where the split has them, otherwise the machine translations")
    parser.add_argument("--fit-embedding-only", action="store_true",
                        help="with --fit and --encoder: keep the dictionary weights and bias, fit only the embedding "
                             "weight and embedding_center")
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="JSON file as printed by --fit; its weights, bias and embedding_center replace the defaults")
    parser.add_argument("--speed", type=int, metavar="N", default=None,
                        help="time the scorer alone on the first N enc/zhb pairs (CPU microseconds per pair)")
    parser.add_argument("--encoder", default=None, metavar="FILE",
                        help="encoder file whose cosine becomes the embedding sub-score (weight from --weights)")
    parser.add_argument("--train-encoder", type=pathlib.Path, default=None, metavar="FILE",
                        help="train an encoder on the train split's machine translations, save it here and exit")
    parser.add_argument("--epochs", type=int, default=10, help="with --train-encoder: training epochs (default: 10)")
    parser.add_argument("--dim", type=int, default=128, help="with --train-encoder: embedding dimension (default: 128)")
    parser.add_argument("--zh-max-ngram", type=int, default=2,
                        help="with --train-encoder: longest Chinese character n-gram feature (default: 2)")
    args = parser.parse_args(argv)

    if args.fit_embedding_only and not (args.fit and args.encoder):
        parser.error("--fit-embedding-only needs --fit and --encoder FILE")
    if args.train_encoder is not None:
        return train_encoder_main(args)
    config = CaptionConfig()
    if args.encoder is not None:
        config = config.replace(embedding_model=args.encoder)
    if args.weights is not None:
        fitted = json.loads(args.weights.read_text())
        config = config.replace(weights={**config.weights, **fitted["weights"]}, translate_bias=fitted["translate_bias"],
                                embedding_center=fitted.get("embedding_center", config.embedding_center))
    if args.speed is not None:
        result = time_scorer(TranslateChecker(config), read_translation_pairs(args.raw, args.speed))
        print(json.dumps(result))
        return 0
    if args.fit:
        pairs = build_pairs(args.raw, args.split, args.limit, half=args.half)
        positive_kinds = ("human",) if pairs["human"] else ("mt_baidu", "mt_google")
        weights, bias, center = fit_weights(pairs, config, positive_kinds, embedding_only=args.fit_embedding_only)
        fitted = {"weights": weights, "translate_bias": bias, "positives": positive_kinds}
        if "embedding" in weights:
            fitted["embedding_center"] = center
        print(json.dumps(fitted))
        return 0

    started = time.perf_counter()
    pairs = build_pairs(args.raw, args.split, args.limit, half=args.half)
    positive_kind = args.positives or ("human" if args.split == "test" else "mt_baidu")
    report = evaluate(pairs, config, positive_kind)
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
