"""Zero-shot image-text retrieval on held-out shards, reported separately for zh and en captions.

For each language, the candidates are the shards' distinct images (grouped by the record's
``sha256``, so one photo stored with several captions counts once) and every caption in that
language. Image-to-text R@K: an image is a hit when any of its captions ranks in the top K.
Text-to-image R@K: a caption is a hit when its image ranks in the top K.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bm6b.train.data import LANGUAGES, expand_shards, read_samples
from bm6b.train.modeling import build_model
from bm6b.train.tokenizer import BilingualTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def load_for_eval(checkpoint: str | None, model_name: str, tokenizer_spec: str, device, seed: int = 0):
    """Return (model, eval transform, tokenizer) from a checkpoint, or a seeded untrained model without one."""
    if checkpoint is None:
        tokenizer = load_tokenizer(tokenizer_spec)
        torch.manual_seed(seed)
        model, _, preprocess = build_model(model_name, tokenizer, device)
        return model.eval(), preprocess, tokenizer

    from bm6b.train.trainer import load_checkpoint

    state = load_checkpoint(checkpoint)
    config = state["config"]
    if state.get("tokenizer_json"):
        # The checkpoint carries the trained tokenizer, so evaluation does not depend on its file.
        tokenizer_path = Path(checkpoint).with_suffix(".tokenizer.json")
        if not tokenizer_path.is_file():
            tokenizer_path.write_text(state["tokenizer_json"], encoding="utf-8")
        tokenizer = BilingualTokenizer(tokenizer_path, config["context_length"])
    else:
        tokenizer = load_tokenizer("simple", config["context_length"])
    model, _, preprocess = build_model(config["model"], tokenizer, device, weights_follow=True)
    model.load_state_dict(state["model"])
    return model.eval(), preprocess, tokenizer


def _recalls(similarity: torch.Tensor, positives: list[set[int]]) -> dict[str, float]:
    """Return R@K over the rows of ``similarity`` (queries x candidates) given each query's positive columns."""
    order = similarity.argsort(dim=1, descending=True)
    result = {}
    for k in RECALL_AT:
        top = order[:, :k].tolist()
        hits = sum(1 for row, wanted in zip(top, positives) if wanted.intersection(row))
        result[f"R@{k}"] = 100.0 * hits / max(len(positives), 1)
    return result


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, shards: list[str] | str, device="cpu", batch_size: int = 128) -> dict:
    """Return retrieval recalls per language: ``{"zh": {"image_to_text": {...}, "text_to_image": {...}}, ...}``."""
    paths = expand_shards(shards)
    image_index: dict[str, int] = {}
    pending_images: list[torch.Tensor] = []
    image_features: list[torch.Tensor] = []
    captions = {lang: [] for lang in LANGUAGES}  # (caption, image index)
    skipped = 0

    def flush_images() -> None:
        if pending_images:
            batch = torch.stack(pending_images).to(device)
            image_features.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu())
            pending_images.clear()

    for sample in read_samples(paths):
        identity = sample["record"].get("sha256") or sample["__key__"]
        if identity not in image_index:
            try:
                with Image.open(io.BytesIO(sample.get("jpg") or b"")) as image:
                    tensor = preprocess(image.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                skipped += 1
                logger.warning("skipping sample %s: bad image (%s)", sample["__key__"], err)
                continue
            image_index[identity] = len(image_index)
            pending_images.append(tensor)
            if len(pending_images) == batch_size:
                flush_images()
        for lang in LANGUAGES:
            raw = sample.get(f"{lang}.txt")
            text = raw.decode("utf-8", errors="replace").strip() if raw else ""
            if text:
                captions[lang].append((text, image_index[identity]))
    flush_images()
    if not image_features:
        raise ValueError(f"no readable samples in {len(paths)} shard(s)")
    images = torch.cat(image_features)

    results: dict = {"images": images.shape[0], "skipped_images": skipped}
    for lang in LANGUAGES:
        pairs = captions[lang]
        if not pairs:
            results[lang] = None
            continue
        text_features = []
        for start in range(0, len(pairs), batch_size):
            tokens = tokenizer([text for text, _ in pairs[start : start + batch_size]]).to(device)
            text_features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        texts = torch.cat(text_features)
        owners = [owner for _, owner in pairs]
        captions_of = [set() for _ in range(images.shape[0])]
        for caption_index, owner in enumerate(owners):
            captions_of[owner].add(caption_index)
        has_caption = [i for i, s in enumerate(captions_of) if s]
        similarity = images[has_caption] @ texts.T
        results[lang] = {
            "captions": len(pairs),
            "images": len(has_caption),
            "image_to_text": _recalls(similarity, [captions_of[i] for i in has_caption]),
            "text_to_image": _recalls(texts @ images[has_caption].T, [{has_caption.index(o)} for o in owners]),
        }
    return results


def format_results(results: dict) -> str:
    lines = []
    for lang in LANGUAGES:
        entry = results.get(lang)
        if not entry:
            lines.append(f"{lang}: no captions")
            continue
        for direction in ("image_to_text", "text_to_image"):
            recalls = "  ".join(f"{k} {v:5.1f}" for k, v in entry[direction].items())
            lines.append(f"{lang} {direction:13s} ({entry['images']} images, {entry['captions']} captions): {recalls}")
    return "\n".join(lines)


def save_results(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
