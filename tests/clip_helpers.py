"""Shared pieces of the CLIP tests: test images, a Beam runner for the CLIP stage, and open_clip reference scores.

The reference scores use open_clip's own API one image at a time (``create_model_and_transforms``,
``get_tokenizer``, ``encode_image``/``encode_text``), never bm6b's loader or batching.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import torch
from PIL import Image

CAPTIONS = [
    ("一只黑狗在草地上奔跑。", "A black dog runs across the grass ."),
    ("两个孩子在海边玩沙子。", "Two children play in the sand at the beach ."),
    (None, "A man rides a bicycle down a city street ."),
    ("一个穿红衣服的女孩在跳舞。", None),
    ("雪山下的一座小木屋。", "A small wooden cabin below a snowy mountain ."),
    ("一群人在公园里野餐。", "A group of people have a picnic in the park ."),
    ("小猫睡在沙发上。", "A kitten sleeps on the sofa ."),
    ("", "A red car parked next to a tree ."),
    ("湖面上有两只天鹅。", "Two swans on a lake ."),
    ("一个男人在厨房里做饭。", "A man cooks in the kitchen ."),
    ("夜晚的城市灯火通明。", "The city is brightly lit at night ."),
]


def make_jpeg(seed: int) -> bytes:
    """Return a JPEG of a smooth colour field plus noise; sizes vary so resize and crop both run."""
    rng = np.random.default_rng(seed)
    height, width = 40 + 13 * (seed % 7), 50 + 17 * (seed % 5)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(80, 255, 3)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_records(count: int = len(CAPTIONS)) -> list[dict]:
    records = []
    for i in range(count):
        zh, en = CAPTIONS[i % len(CAPTIONS)]
        records.append({"key": f"{i:016x}", "image": make_jpeg(i), "caption_zh": zh or None, "caption_en": en})
    return records


def _to_json(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "image"}, ensure_ascii=False)


def run_clip_stage(records: list[dict], config, folder: Path) -> tuple[dict[str, dict], list[dict]]:
    """Run ``stages.ClipScore(config)`` on an in-process Beam pipeline; return (kept by key, rejects)."""
    from bm6b.pipelines import stages

    folder.mkdir(parents=True, exist_ok=True)
    pipeline = beam.Pipeline(runner="FnApiRunner")
    result = pipeline | beam.Create(records) | stages.ClipScore(config)
    _ = result.records | "KeptJson" >> beam.Map(_to_json) | "WriteKept" >> beam.io.WriteToText(str(folder / "kept"))
    _ = result.rejects | "RejectJson" >> beam.Map(_to_json) | "WriteRejects" >> beam.io.WriteToText(str(folder / "rejects"))
    pipeline.run().wait_until_finish()

    def read(prefix: str) -> list[dict]:
        rows = []
        for path in sorted(folder.glob(f"{prefix}-*")):
            rows.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
        return rows

    return {r["key"]: r for r in read("kept")}, read("rejects")


def open_clip_model(model_name: str, pretrained: str | None = None, seed: int = 0):
    """Create a model with open_clip itself: random init under ``seed``, or weights from a file."""
    import open_clip

    from bm6b.models import register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def reference_scores(model, preprocess, tokenizer, records: list[dict]) -> dict[str, dict[str, float]]:
    """Return key -> {language: cosine}, scoring one image and one caption at a time."""
    scores = {}
    with torch.no_grad():
        for record in records:
            image = preprocess(Image.open(io.BytesIO(record["image"])).convert("RGB")).unsqueeze(0)
            image_features = model.encode_image(image)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            row = {}
            for language in ("zh", "en"):
                caption = record.get(f"caption_{language}")
                if caption:
                    text_features = model.encode_text(tokenizer([caption]))
                    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
                    row[language] = float((image_features * text_features).sum())
            scores[record["key"]] = row
    return scores
