"""The contrastive pretraining loop: open_clip models on bm6b shards with the grouped ITC loss.

Runs as one process or under torchrun (``torchrun --nproc-per-node N -m bm6b.train ...``): gloo
on CPU, NCCL on GPU, multi-node through torchrun's rendezvous. Each optimizer step takes m
micro-batches of b pairs per rank, computes the grouped ITC loss inside groups of k ranks
(``bm6b.train.loss``), and averages parameter gradients over all ranks once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bm6b.train.data import PositionTracker, ShardBatches, expand_shards, make_loader
from bm6b.train.loss import MAX_LOG_LOGIT_SCALE, GroupedClipLoss, new_itc_group
from bm6b.train.modeling import build_model, unwrap
from bm6b.train.step import contrastive_step
from bm6b.train.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    shards: list[str]
    output: str
    model: str = "bm6b-tiny"
    tokenizer: str = "simple"
    context_length: int = 77
    batch_size: int = 64  # pairs per rank per micro-batch (b)
    accum: int = 1  # micro-batches per optimizer step (m)
    itc_group_size: int | None = None  # ranks per ITC group (k); None: ranks per node
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 100
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    grad_checkpointing: bool = False
    workers: int = 2
    text_policy: str = "random"
    mask_duplicates: bool = True  # pairs of one step that share an image are not negatives of each other
    crop_scale_min: float = 0.9  # smallest area fraction of the training random-resized crop
    shuffle_buffer: int = 1000
    seed: int = 0
    save_every: int = 500
    log_every: int = 10
    resume: str = "auto"  # auto (output/last.pt when present), none, or a checkpoint path
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)


class WarmupCosine:
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""

    def __init__(self, optimizer, lr: float, warmup: int, total: int, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.lr, self.warmup, self.total, self.min_lr = lr, warmup, total, min_lr
        self.step_count = 0
        self._apply()

    def value(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.value(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_spec: str = "auto") -> DistInfo:
    """Initialize torch.distributed from torchrun's environment (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = torch.cuda.is_available() if device_spec == "auto" else device_spec.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, local_world_size, device)


def default_group_size(info: DistInfo) -> int:
    """Return ranks per node when it divides the world size (intra-node ITC), else the world size."""
    if info.world_size % info.local_world_size == 0:
        return info.local_world_size
    return info.world_size


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's convention: no decay on gains, biases, embeddings of rank < 2 and the logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "logit_scale" in name or "bias" in name or "ln" in name or "bn" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _rng_state(device: torch.device) -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    python = state["python"]
    gauss = python[-1] or None
    random.setstate((state["python_version"], tuple(python[:-1]), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` with torch.save to a temporary file, fsync it, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain Python containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {path}: {err}") from err


def _gather_objects(value, info: DistInfo) -> list:
    if info.world_size == 1:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _autocast_factory(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), "bf16"
    raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")


class MetricsLog:
    """Append-only JSONL metrics on rank 0. After a resume, steps past the checkpoint appear twice; the later line wins."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> dict[int, dict]:
    """Return the last logged record of each step in a metrics file."""
    records: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if "step" in record:
                    records[record["step"]] = record
    return records


def train(config: TrainConfig) -> dict:
    """Train according to ``config``; return the final metrics of rank 0."""
    info = setup_distributed(config.device)
    output = Path(config.output)
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
    if info.world_size > 1:
        dist.barrier()

    # Seeding before model creation makes every rank start from the same weights.
    torch.manual_seed(config.seed)
    random.seed(config.seed + info.rank)
    np.random.seed((config.seed + info.rank) % 2**32)

    shards = expand_shards(config.shards)
    tokenizer = load_tokenizer(config.tokenizer, config.context_length)
    model, preprocess_train, _ = build_model(config.model, tokenizer, info.device, config.crop_scale_min)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    autocast, precision = _autocast_factory(config.precision, info.device)

    group_size = config.itc_group_size or default_group_size(info)
    itc_group = new_itc_group(group_size)
    loss_fn = GroupedClipLoss(itc_group)

    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
    )
    scheduler = WarmupCosine(optimizer, config.lr, config.warmup, config.steps, config.min_lr)

    start_step = 0
    positions = None
    resume_path = _resume_path(config, output)
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        _check_compatible(state, config, info)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        positions = PositionTracker.load_positions(state["data"][info.rank], config.workers)
        _set_rng_state(state["rng"][info.rank], info.device)
        logger.info("resumed from %s at step %d", resume_path, start_step)

    train_model: nn.Module = model
    if info.world_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    dataset = ShardBatches(
        shards,
        config.batch_size,
        preprocess_train,
        tokenizer,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=config.workers,
        policy=config.text_policy,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        positions=positions,
    )
    tracker = PositionTracker(config.workers, positions)
    batches = iter(make_loader(dataset, config.workers))
    metrics = MetricsLog(output / METRICS_NAME, info.is_main)
    samples_per_step = info.world_size * config.accum * config.batch_size

    if info.is_main:
        logger.info(
            "training %s: world %d, ITC group %d, micro-batch %d, accumulation %d (%d pairs per step, "
            "%d negatives per sample), precision %s, device %s",
            config.model, info.world_size, group_size, config.batch_size, config.accum, samples_per_step,
            group_size * config.accum * config.batch_size - 1, precision, info.device,
        )

    progress = None
    if info.is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True)

    last_record: dict = {}
    window_start, window_samples = time.perf_counter(), 0
    for step in range(start_step, config.steps):
        micro_batches, image_ids = [], []
        for _ in range(config.accum):
            batch = next(batches)
            tracker.update(batch)
            images = batch["images"].to(info.device, non_blocking=True)
            texts = batch["texts"].to(info.device, non_blocking=True)
            micro_batches.append((images, texts))
            image_ids.append(batch["image_ids"].to(info.device, non_blocking=True))

        optimizer.zero_grad(set_to_none=True)
        sample_ids = image_ids if config.mask_duplicates else None
        result = contrastive_step(train_model, micro_batches, loss_fn, autocast, sample_ids)
        grad_norm = (
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if config.grad_clip > 0
            else torch.tensor(float("nan"))
        )
        optimizer.step()
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        window_samples += samples_per_step
        done = step + 1

        if done % config.log_every == 0 or done == config.steps:
            loss = result.loss.detach().float().clone()
            if info.world_size > 1:
                dist.all_reduce(loss)
                loss /= info.world_size
            elapsed = time.perf_counter() - window_start
            last_record = {
                "step": done,
                "loss": loss.item(),
                "lr": lr,
                "logit_scale": result.logit_scale.float().item(),
                "grad_norm": float(grad_norm),
                "samples_per_s": window_samples / elapsed if elapsed > 0 else None,
                "epoch": tracker.epoch,
                "time": time.time(),
            }
            metrics.write(last_record)
            window_start, window_samples = time.perf_counter(), 0
            if progress is not None:
                progress.set_postfix(loss=f"{last_record['loss']:.4f}", lr=f"{lr:.2e}", scale=f"{last_record['logit_scale']:.1f}")
        if progress is not None:
            progress.update(1)

        if done % config.save_every == 0 or done == config.steps:
            _save(output, config, info, model, optimizer, scheduler, done, tracker)

    if progress is not None:
        progress.close()
    if info.world_size > 1:
        dist.barrier()
    return last_record


def _resume_path(config: TrainConfig, output: Path) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume == "auto":
        candidate = output / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return path


def _check_compatible(state: dict, config: TrainConfig, info: DistInfo) -> None:
    saved = state["config"]
    for name in ("model", "batch_size", "accum", "seed", "text_policy"):
        if saved.get(name) != getattr(config, name):
            raise ValueError(f"checkpoint was trained with {name}={saved.get(name)!r}, not {getattr(config, name)!r}")
    if int(state["world_size"]) != info.world_size:
        raise ValueError(
            f"checkpoint was written by {state['world_size']} ranks; resume with the same number of processes "
            f"(got {info.world_size}) to continue the same data order"
        )


def _save(output, config, info, model, optimizer, scheduler, step, tracker) -> None:
    data_states = _gather_objects(tracker.state_dict(), info)
    rng_states = _gather_objects(_rng_state(info.device), info)
    if info.is_main:
        tokenizer_json = Path(config.tokenizer).read_text(encoding="utf-8") if config.tokenizer != "simple" else None
        payload = {
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "world_size": info.world_size,
            "data": data_states,
            "rng": [_to_cpu(s) for s in rng_states],
            "config": {k: v for k, v in asdict(config).items() if k != "extra"},
            "tokenizer_json": tokenizer_json,
        }
        save_checkpoint(output / CHECKPOINT_NAME, payload)
        logger.info("saved checkpoint at step %d to %s", step, output / CHECKPOINT_NAME)
    if info.world_size > 1:
        dist.barrier()


def _to_cpu(state: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
