"""Reading bm6b shards for training: text views, a deterministic resumable order, and batches.

A shard is a WebDataset tar whose samples have ``KEY.jpg``, optional ``KEY.zh.txt`` and
``KEY.en.txt``, and ``KEY.json``. A *text view* is one (image, caption) pair taken from a
sample; the policy chooses which captions become views.

Order: each data-loader worker of each rank owns a *slot* (rank * workers + worker). Per epoch,
the shard list is shuffled with the seed and the epoch number and shards are dealt to the slots
in turn. With fewer shards than slots, every slot reads all shards and keeps every n-th sample.
A seeded shuffle buffer mixes samples inside each slot. The order of views is then a pure
function of (seed, epoch, slot), so a slot's position is just (epoch, views consumed), and a
resumed run replays the epoch, skipping consumed views without decoding their images.
Augmentation is seeded per view from the same numbers, so resumed batches are identical.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

TEXT_POLICIES = ("random", "zh", "en", "both")
LANGUAGES = ("zh", "en")


def expand_shards(specs: str | list[str]) -> list[str]:
    """Expand brace patterns (``DIR/{00000..00009}.tar``) and globs into an ordered list of tar paths."""
    if isinstance(specs, str):
        specs = [specs]
    paths: list[str] = []
    for spec in specs:
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths.extend(matches)
    if not paths:
        raise FileNotFoundError(f"no shards match {specs}")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, first: {missing[0]}")
    return paths


def iter_tar_samples(path: str) -> Iterator[dict]:
    """Yield the samples of one WebDataset tar as dicts: ``__key__``, ``__shard__`` and one entry per suffix.

    Members of one sample are contiguous and share the part of the name before the first dot.
    A corrupt or truncated tar is logged and ends the shard early; samples read before the
    damage are kept.
    """
    current: dict | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, dot, suffix = name.partition(".")
                if not dot:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": path}
                current[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        logger.error("shard %s is corrupt or truncated (%s); skipping the rest of it", path, err)
    if current is not None:
        yield current


def text_views(sample: dict, policy: str, rng: random.Random) -> list[tuple[str, str]]:
    """Return the (language, caption) views of a sample under ``policy``.

    ``random`` picks one of the available captions, ``zh``/``en`` keep only that language (a
    sample without it gives no view), ``both`` gives one view per available caption.
    """
    captions = []
    for lang in LANGUAGES:
        raw = sample.get(f"{lang}.txt")
        if raw:
            text = raw.decode("utf-8", errors="replace").strip()
            if text:
                captions.append((lang, text))
    if policy == "both":
        return captions
    if policy == "random":
        return [rng.choice(captions)] if captions else []
    if policy in LANGUAGES:
        return [c for c in captions if c[0] == policy]
    raise ValueError(f"unknown text policy {policy!r}; choose one of {TEXT_POLICIES}")


def image_id(sample: dict) -> int:
    """Return a 60-bit int64 id of the sample's image: its record's sha256, else its key.

    Curate writes one sample per (image, caption) row, so a photo with several captions appears
    under several keys with one sha256. The loss uses these ids to avoid treating such samples
    as negatives of each other.
    """
    digest = None
    if sample.get("json"):
        try:
            record = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("sha256"), str):
            digest = record["sha256"]
    if digest is None or len(digest) < 15:
        digest = hashlib.sha256(sample["__key__"].encode("utf-8")).hexdigest()
    try:
        return int(digest[:15], 16)
    except ValueError:
        return int(hashlib.sha256(digest.encode("utf-8")).hexdigest()[:15], 16)


def _mix(*numbers: int) -> int:
    """Combine integers into one seed (stable across processes, unlike ``hash`` of a tuple of str)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value * 1_000_003 ^ (number & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return value


@dataclass
class SlotPosition:
    epoch: int = 0
    consumed: int = 0  # views consumed in this epoch, including ones skipped for bad images


class ShardBatches(IterableDataset):
    """An endless stream of batches (dicts with ``images``, ``texts``, ``langs``, ``image_ids`` and position fields).

    ``positions`` maps a worker id to the ``SlotPosition`` to resume from. Batches never span
    epochs; the last partial batch of an epoch is dropped.
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        image_transform: Callable,
        tokenizer: Callable,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        policy: str = "random",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        positions: dict[int, SlotPosition] | None = None,
    ):
        if policy not in TEXT_POLICIES:
            raise ValueError(f"unknown text policy {policy!r}; choose one of {TEXT_POLICIES}")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(num_workers, 1)
        self.policy = policy
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, 1)
        self.positions = positions or {}

    def _slot_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        order = list(self.shards)
        random.Random(_mix(self.seed, epoch)).shuffle(order)
        if len(order) >= slots:
            for path in order[slot::slots]:
                yield from iter_tar_samples(path)
            return
        index = 0
        for path in order:
            for sample in iter_tar_samples(path):
                if index % slots == slot:
                    yield sample
                index += 1

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _epoch_views(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[dict, str, str]]:
        rng = random.Random(_mix(self.seed, epoch, slot))
        for sample in self._shuffled(self._slot_samples(epoch, slot, slots), rng):
            for lang, caption in text_views(sample, self.policy, rng):
                yield sample, lang, caption

    def _decode(self, sample: dict, view_seed: int):
        data = sample.get("jpg")
        if not data:
            raise ValueError("no jpg member")
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
        # Fork the RNG so a loader without workers leaves the trainer's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed)
            return self.image_transform(image)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slots = self.world_size * self.num_workers
        slot = self.rank * self.num_workers + worker
        start = self.positions.get(worker, SlotPosition())
        epoch, skip = start.epoch, start.consumed
        bad_images = 0

        while True:
            consumed = 0
            produced = 0
            images, texts, langs, keys, ids = [], [], [], [], []
            for sample, lang, caption in self._epoch_views(epoch, slot, slots):
                consumed += 1
                if consumed <= skip:
                    continue
                try:
                    images.append(self._decode(sample, _mix(self.seed, epoch, slot, consumed)))
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    bad_images += 1
                    if bad_images <= 10 or bad_images % 1000 == 0:
                        logger.warning("skipping sample %s in %s: bad image (%s); %d so far",
                                       sample["__key__"], sample["__shard__"], err, bad_images)
                    continue
                texts.append(caption)
                langs.append(lang)
                keys.append(sample["__key__"])
                ids.append(image_id(sample))
                if len(images) == self.batch_size:
                    produced += 1
                    yield {
                        "images": torch.stack(images),
                        "texts": self.tokenizer(texts),
                        "langs": langs,
                        "keys": keys,
                        "image_ids": torch.tensor(ids, dtype=torch.int64),
                        "worker": worker,
                        "epoch": epoch,
                        "consumed": consumed,
                    }
                    images, texts, langs, keys, ids = [], [], [], [], []
            if produced == 0 and skip == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker} got no full batch of {self.batch_size} from "
                    f"{len(self.shards)} shard(s) in epoch {epoch}; use more data, fewer workers or a smaller batch"
                )
            epoch, skip = epoch + 1, 0


class PositionTracker:
    """The data position of the batches the trainer has consumed, per worker, for checkpoints."""

    def __init__(self, num_workers: int, positions: dict[int, SlotPosition] | None = None):
        self.num_workers = max(num_workers, 1)
        self.positions = dict(positions or {})

    def update(self, batch: dict) -> None:
        self.positions[int(batch["worker"])] = SlotPosition(int(batch["epoch"]), int(batch["consumed"]))

    @property
    def epoch(self) -> int:
        return min((p.epoch for p in self.positions.values()), default=0)

    def state_dict(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "positions": {w: [p.epoch, p.consumed] for w, p in self.positions.items()},
        }

    @staticmethod
    def load_positions(state: dict, num_workers: int) -> dict[int, SlotPosition]:
        saved = int(state.get("num_workers", 1))
        if saved != max(num_workers, 1):
            raise ValueError(
                f"the checkpoint's data position was recorded with {saved} loader worker(s); "
                f"resume with --workers {saved} to continue the same data order"
            )
        return {int(w): SlotPosition(int(e), int(c)) for w, (e, c) in state.get("positions", {}).items()}


def make_loader(dataset: ShardBatches, num_workers: int) -> DataLoader:
    """Wrap the batch stream; workers are read round-robin in order, so the batch order is deterministic."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def read_samples(shards: list[str]) -> Iterator[dict]:
    """Yield every sample of the shards in order, with its record parsed from ``KEY.json`` when present."""
    for path in shards:
        for sample in iter_tar_samples(path):
            record = {}
            if sample.get("json"):
                try:
                    record = json.loads(sample["json"])
                except json.JSONDecodeError as err:
                    logger.warning("sample %s in %s: invalid JSON record (%s)", sample["__key__"], path, err)
            sample["record"] = record
            yield sample
