"""Load an open_clip model, its image transform and its tokenizer from any source bm6b supports.

One loader serves scoring and training, so a checkpoint written by either side loads the same way.
``load_clip(model_name, checkpoint)`` accepts:

- ``checkpoint=None``: the named open_clip config (built-in, or bundled like ``bm6b-tiny``) with
  random weights drawn under a fixed seed, so every worker process builds the same model;
- a checkpoint file: an open_clip state dict (``.pt``, ``.pth``, ``.bin`` or ``.safetensors``), an
  open_clip training checkpoint (``{"state_dict": ...}``), or a checkpoint written by ``bm6b train``
  (``{"model": ..., "config": ..., "tokenizer_json": ...}``; its config names the model and its
  trained tokenizer replaces open_clip's). Files are read with ``torch.load(weights_only=True)``;
- a folder holding one checkpoint file, optionally an ``open_clip_config.json`` (then the config
  comes from the folder and ``model_name`` may be None) and optionally a ``tokenizer.json`` written
  by ``bm6b tokenizer train``, which replaces open_clip's tokenizer;
- an open_clip pretrained tag such as ``laion2b_s34b_b79k``. open_clip then fetches the weights
  from its cache or, when the user's machine has hub access, from the hub. bm6b's own defaults and
  tests never pass a tag.

The text tower's vocabulary size and context length follow the checkpoint's tensors, so models
trained with a bm6b tokenizer load under their base config name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from bm6b.models import register_model_configs, weights_loaded_later

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0

# Tried in this order when a folder is given; otherwise the folder must contain exactly one
# file with a checkpoint suffix.
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "last.pt",
    "checkpoint.pt",
    "model.pt",
    "epoch_latest.pt",
)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
OPEN_CLIP_CONFIG = "open_clip_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"

# Keys under which training checkpoints nest the model's state dict.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class ClipSource:
    """A resolved model source: which config to build and which files to read into it."""

    model_name: str  # an open_clip config name, or "local-dir:PATH" for a folder with its own config
    weights: str | None = None  # checkpoint file read by bm6b
    pretrained_tag: str | None = None  # weights fetched by open_clip
    tokenizer_file: str | None = None  # tokenizer JSON written by `bm6b tokenizer train`
    vocab_size: int | None = None  # text tower sizes read from the checkpoint's tensors
    context_length: int | None = None


@dataclasses.dataclass
class CheckpointContents:
    state_dict: dict[str, Any]
    model_name: str | None = None  # from a bm6b trainer checkpoint's config
    tokenizer_json: str | None = None


def _find_checkpoint(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) found in CLIP checkpoint folder {folder}"
        )
    raise ValueError(
        f"CLIP checkpoint folder {folder} contains several checkpoint files "
        f"({', '.join(p.name for p in candidates)}); pass the file itself"
    )


def _find_tokenizer(folder: Path) -> str | None:
    for candidate in (folder / TOKENIZER_FILE, folder / TOKENIZER_DIR / TOKENIZER_FILE):
        if candidate.is_file():
            return str(candidate)
    return None


def read_checkpoint(path: str) -> CheckpointContents:
    """Read a checkpoint file and unwrap the model's state dict from any supported envelope.

    ``.pt``/``.pth``/``.bin`` files are memory-mapped, so reading one only to learn its model
    config or tokenizer costs little. Raises ValueError for files that contain no state dict.
    """
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint: Any = load_file(path, device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError here
            raise ValueError(f"cannot read CLIP checkpoint {path}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"CLIP checkpoint {path} contains a {type(checkpoint).__name__}, not a state dict")

    contents = CheckpointContents(state_dict={})
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), str):
        contents.model_name = config["model"]
    if isinstance(checkpoint.get("tokenizer_json"), str):
        contents.tokenizer_json = checkpoint["tokenizer_json"]
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    for name, tensor in checkpoint.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        contents.state_dict[name] = tensor
    state_dict = contents.state_dict
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(
            f"CLIP checkpoint {path} is not a state dict: expected tensors, at the top level or under one of "
            f"the keys {', '.join(STATE_DICT_KEYS)}"
        )
    return contents


def _text_sizes(state_dict: dict[str, Any]) -> tuple[int | None, int | None]:
    """Return (vocab_size, context_length) of the checkpoint's text tower, when its tensors show them."""
    vocab_size = context_length = None
    for prefix in ("", "text."):
        embedding = state_dict.get(f"{prefix}token_embedding.weight")
        positions = state_dict.get(f"{prefix}positional_embedding")
        if embedding is not None and embedding.ndim == 2:
            vocab_size = int(embedding.shape[0])
        if positions is not None and positions.ndim == 2:
            context_length = int(positions.shape[0])
    return vocab_size, context_length


def _cached_tokenizer_file(tokenizer_json: str) -> str:
    """Write a checkpoint's embedded tokenizer JSON to the temp folder once; return its path."""
    digest = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"bm6b-tokenizer-{digest}.json"
    if not path.is_file():
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(tokenizer_json, encoding="utf-8")
        os.replace(partial, path)
    return str(path)


def _source_from_file(model_name: str | None, path: Path, tokenizer_file: str | None) -> ClipSource:
    contents = read_checkpoint(str(path))
    if contents.model_name:
        if model_name and model_name != contents.model_name:
            raise ValueError(
                f"CLIP checkpoint {path} was trained as model {contents.model_name!r}, not {model_name!r}; "
                "omit the model name or pass the one it was trained with"
            )
        model_name = contents.model_name
    if contents.tokenizer_json and not tokenizer_file:
        tokenizer_file = _cached_tokenizer_file(contents.tokenizer_json)
    _check_config_name(model_name, str(path))
    vocab_size, context_length = _text_sizes(contents.state_dict)
    return ClipSource(model_name, str(path), tokenizer_file=tokenizer_file, vocab_size=vocab_size,
                      context_length=context_length)


def resolve_source(model_name: str | None, checkpoint: str | None) -> ClipSource:
    """Work out what ``(model_name, checkpoint)`` refers to; raise a clear error when it is unusable."""
    import open_clip

    register_model_configs()
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            weights = _find_checkpoint(path)
            tokenizer_file = _find_tokenizer(path)
            if (path / OPEN_CLIP_CONFIG).is_file():
                return ClipSource(f"local-dir:{path}", str(weights), tokenizer_file=tokenizer_file)
            return _source_from_file(model_name, weights, tokenizer_file)
        if path.is_file():
            return _source_from_file(model_name, path, None)
        if model_name and checkpoint in open_clip.list_pretrained_tags_by_model(model_name):
            return ClipSource(model_name, pretrained_tag=checkpoint)
        raise FileNotFoundError(
            f"CLIP checkpoint {checkpoint!r} is neither a file, a folder, nor an open_clip pretrained tag "
            f"of model {model_name!r}"
        )
    _check_config_name(model_name, None)
    return ClipSource(model_name)


def _check_config_name(model_name: str | None, checkpoint: str | None) -> None:
    import open_clip

    if not model_name:
        where = f" (or put {OPEN_CLIP_CONFIG} into the checkpoint folder)" if checkpoint else ""
        raise ValueError(f"a CLIP model config name is required, e.g. bm6b-tiny or ViT-B-32{where}")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"unknown open_clip model config {model_name!r}; known configs include bm6b-tiny, ViT-B-32, ViT-L-14 "
            "(see open_clip.list_models())"
        )


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def model_id_for(source: ClipSource, digest: str | None = None) -> str:
    """Return the id stored with every score, e.g. ``bm6b-tiny:random-init`` or ``ViT-B-32:ckpt.pt@1a2b3c4d5e6f``.

    Checkpoint ids carry the first 12 hex digits of the file's sha256, so two checkpoints that
    share a file name (``epoch_latest.pt``) get different ids.
    """
    name = source.model_name
    if name.startswith("local-dir:"):
        name = Path(name[len("local-dir:"):]).name
    if source.pretrained_tag:
        return f"{name}:{source.pretrained_tag}"
    if source.weights:
        return f"{name}:{Path(source.weights).name}@{digest or _file_digest(source.weights)}"
    seed = "" if RANDOM_INIT_SEED == 0 else f"-seed{RANDOM_INIT_SEED}"
    return f"{name}:random-init{seed}"


def _load_weights(model, path: str) -> None:
    state_dict = read_checkpoint(path).state_dict
    logit_scale = state_dict.get("logit_scale")
    if logit_scale is not None and logit_scale.shape != model.logit_scale.shape:
        state_dict["logit_scale"] = logit_scale.reshape(model.logit_scale.shape)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # tensor shapes differ from the config's
        raise ValueError(f"CLIP checkpoint {path} does not match the model config: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"CLIP checkpoint {path} does not match the model config: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def _create_model(source: ClipSource, device: str):
    """Build the model from its config; weights from a tag load here, bm6b checkpoints later."""
    import open_clip
    import torch

    overrides = {}
    if source.vocab_size or source.context_length:
        text_cfg = dict(open_clip.get_model_config(source.model_name)["text_cfg"])
        text_cfg["vocab_size"] = source.vocab_size or text_cfg.get("vocab_size")
        text_cfg["context_length"] = source.context_length or text_cfg.get("context_length")
        overrides["text_cfg"] = text_cfg

    if device == "meta":
        # A meta model only yields transforms, so the warning about missing weights is left to load_clip.
        with torch.device("meta"), weights_loaded_later():
            return open_clip.create_model(source.model_name, device="meta", load_weights=False, **overrides)
    if source.pretrained_tag:
        # NOTE: bm6b's tests resolve tags but never load one, because that needs the hub or a filled cache.
        return open_clip.create_model(source.model_name, pretrained=source.pretrained_tag)
    quiet = weights_loaded_later() if source.weights else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), quiet:
        torch.manual_seed(RANDOM_INIT_SEED)
        return open_clip.create_model(source.model_name, load_weights=False, **overrides)


def _transforms(model, source: ClipSource) -> tuple[Callable, Callable]:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if source.pretrained_tag:
        tag_cfg = open_clip.get_pretrained_cfg(source.model_name, source.pretrained_tag)
        preprocess_cfg = merge_preprocess_dict(preprocess_cfg, tag_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)

    if source.tokenizer_file:
        from bm6b.train.tokenizer import BilingualTokenizer

        tokenizer = BilingualTokenizer(source.tokenizer_file, context_length=model.context_length)
        if tokenizer.vocab_size != model.vocab_size:
            raise ValueError(
                f"tokenizer {source.tokenizer_file} has {tokenizer.vocab_size} tokens but the model's text tower "
                f"has {model.vocab_size}"
            )
    else:
        tokenizer = open_clip.get_tokenizer(source.model_name, context_length=model.context_length)
    return preprocess, tokenizer


def load_transforms(model_name: str | None, checkpoint: str | None = None) -> tuple[Callable, Callable]:
    """Return ``(preprocess, tokenizer)`` of a model without loading its weights.

    The model is built on the ``meta`` device, which allocates nothing, so preprocessing workers
    get exactly the transform and tokenizer that ``load_clip`` returns at a fraction of the cost.
    """
    source = resolve_source(model_name, checkpoint)
    return _transforms(_create_model(source, "meta"), source)


def _dtype(precision: str, device: str):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown CLIP precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("CLIP precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def check_device(device: str) -> None:
    """Raise ValueError for a device string torch cannot use on this machine."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid torch device {device!r}: {err}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"CLIP device {device!r} requested but CUDA is not available here; use --clip-device cpu")


def load_clip(
    model_name: str | None,
    checkpoint: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
):
    """Load a CLIP model in eval mode and return ``(model, preprocess, tokenizer, model_id)``.

    ``preprocess`` maps a PIL image to a float32 tensor; ``tokenizer`` maps a list of texts to an
    int64 tensor of the model's context length. ``precision`` (fp32, fp16, bf16) is the dtype of
    the weights on ``device``; callers cast image tensors to ``next(model.parameters()).dtype``.
    """
    dtype = _dtype(precision, device)
    check_device(device)
    source = resolve_source(model_name, checkpoint)

    model = _create_model(source, "cpu")
    digest = None
    if source.weights:
        digest = _file_digest(source.weights)
        _load_weights(model, source.weights)
    preprocess, tokenizer = _transforms(model, source)

    model = model.to(device=device, dtype=dtype).eval()
    model_id = model_id_for(source, digest)
    logger.info("loaded CLIP model %s on %s (%s)", model_id, device, precision)
    return model, preprocess, tokenizer, model_id

