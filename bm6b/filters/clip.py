"""CLIP scoring with open_clip: cosine similarity between an image and each of its captions.

Models come from a named open_clip config (random init unless a checkpoint is given; bm6b ships
``bm6b-tiny`` for tests) plus an optional local checkpoint file. Nothing is downloaded.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)


def model_id(model_name: str, checkpoint: str | None) -> str:
    """Return the id stored with every score: the config name and the checkpoint file, if any."""
    if checkpoint:
        return f"{model_name}:{os.path.basename(checkpoint)}"
    return f"{model_name}:random-init"


class ClipScorer:
    def __init__(self, model_name: str, checkpoint: str | None = None, device: str = "cpu"):
        import open_clip
        import torch

        from bm6b.models import register_model_configs

        register_model_configs()
        if checkpoint and not os.path.exists(checkpoint):
            raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint}")
        self.torch = torch
        self.device = device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=checkpoint or None, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_id = model_id(model_name, checkpoint)
        logger.info("loaded CLIP model %s on %s", self.model_id, device)

    def score_batch(self, records: list[dict[str, Any]]) -> None:
        """Fill ``clip_score_zh``, ``clip_score_en`` and ``clip_model`` of each record in place."""
        torch = self.torch
        images = torch.stack(
            [self.preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in records]
        ).to(self.device)
        with torch.inference_mode():
            image_features = self.model.encode_image(images, normalize=True)
            for slot in ("zh", "en"):
                rows = [i for i, r in enumerate(records) if r.get(f"caption_{slot}")]
                if not rows:
                    continue
                tokens = self.tokenizer([records[i][f"caption_{slot}"] for i in rows]).to(self.device)
                text_features = self.model.encode_text(tokens, normalize=True)
                scores = (image_features[rows] * text_features).sum(dim=-1).tolist()
                for i, score in zip(rows, scores):
                    records[i][f"clip_score_{slot}"] = float(score)
        for record in records:
            record["clip_model"] = self.model_id
