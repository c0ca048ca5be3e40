"""GPU checks in one script (under 5 minutes on one H200): bf16 training throughput, and loss memory at scale.

Part 1 trains an open_clip model with the bm6b trainer on one GPU in bf16 autocast and records
samples/s and peak GPU memory. It reads ``--shards`` when given (e.g. the curated Flickr8k
train split) and otherwise writes synthetic shape shards first.

Part 2 emulates one rank of a large data-parallel job in a single process: this rank's b local
features carry gradients, the other ranks' features are random tensors of the right shape (as if
all-gathered). It measures peak memory and time of the loss forward and backward for the naive
loss (full (W*b)^2 logits, open_clip's default), the exact local loss (b x W*b logits), and GBA
with groups of k ranks (b x k*b logits). NCCL cannot run two ranks on one GPU, so no collective
is timed here.

Without CUDA the script prints a message and exits with status 0. Results go to
``--output`` (default ``$OUT/train_gpu.json`` when ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def train_throughput(args, work: Path) -> dict:
    from bm6b.train.shardwriter import write_synthetic_shards
    from bm6b.train.trainer import TrainConfig, read_metrics, train

    shards = args.shards
    if not shards:
        shards = write_synthetic_shards(work / "synthetic", args.synthetic_samples, seed=0, samples_per_shard=1000)
    results = {}
    for model_name, batch_size, steps in ((args.model, args.batch_size, args.steps), ("bm6b-tiny", 1024, 60)):
        torch.cuda.reset_peak_memory_stats()
        config = TrainConfig(
            shards=list(shards), output=str(work / f"run-{model_name}"), model=model_name, batch_size=batch_size,
            steps=steps, warmup=10, lr=5e-4, workers=args.workers, precision="bf16", device="cuda",
            grad_checkpointing=args.grad_checkpointing, log_every=10, save_every=10**9, resume="none", progress=False,
        )
        started = time.monotonic()
        last = train(config)
        metrics = read_metrics(Path(config.output) / "metrics.jsonl")
        # The first logged window includes compilation and cuDNN autotuning.
        steady = [m["samples_per_s"] for s, m in sorted(metrics.items()) if s > 20 and m.get("samples_per_s")]
        results[model_name] = {
            "batch_size": batch_size,
            "steps": steps,
            "wall_s": round(time.monotonic() - started, 1),
            "samples_per_s_median": statistics.median(steady) if steady else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "final_loss": last.get("loss"),
            "shards": "given" if args.shards else "synthetic",
        }
        print(json.dumps({model_name: results[model_name]}), flush=True)
    return results


def _loss_step(local_image, local_text, columns_image, columns_text, scale, row_offset, square=False):
    logits_image = scale * local_image @ columns_text.T
    # open_clip's naive loss reuses the transposed square matrix for text-to-image.
    logits_text = logits_image.T if square else scale * local_text @ columns_image.T
    labels = torch.arange(local_image.shape[0], device=local_image.device) + row_offset
    return 0.5 * (F.cross_entropy(logits_image.float(), labels) + F.cross_entropy(logits_text.float(), labels))


def emulate_rank(method: str, batch: int, world: int, group: int, dim: int, dtype: torch.dtype, repeats: int) -> dict:
    """Return peak memory and median time of one rank's loss forward+backward, with random remote features."""
    device = torch.device("cuda")
    columns = {"naive": world, "local": world, "gba": group}[method] * batch
    generator = torch.Generator(device=device).manual_seed(0)

    def normalized(rows):
        return F.normalize(torch.randn(rows, dim, device=device, dtype=dtype, generator=generator), dim=-1)

    local_image = normalized(batch).requires_grad_()
    local_text = normalized(batch).requires_grad_()
    remote_image = normalized(columns - batch)
    remote_text = normalized(columns - batch)
    scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for repeat in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        all_image = torch.cat([local_image, remote_image])
        all_text = torch.cat([local_text, remote_text])
        if method == "naive":
            # open_clip's default: every rank builds the full matrix over all W*b samples.
            loss = _loss_step(all_image, all_text, all_image, all_text, scale.exp(), 0, square=True)
        else:
            # This rank's rows come first in the gathered columns, so its labels start at 0.
            loss = _loss_step(local_image, local_text, all_image, all_text, scale.exp(), 0)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if repeat >= 2:
            times.append(start.elapsed_time(end))
        local_image.grad = local_text.grad = scale.grad = None
    return {
        "method": method,
        "b": batch,
        "world": world,
        "k": group if method == "gba" else world,
        "global_batch": batch * world,
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_loss_memory_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "median_ms": statistics.median(times),
    }


def loss_memory(args) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for global_batch in args.global_batches:
            for world in args.worlds:
                batch = global_batch // world
                configs = [("local", world), ("gba", args.group)]
                if global_batch <= args.naive_max:
                    configs.insert(0, ("naive", world))
                for method, group in configs:
                    try:
                        row = emulate_rank(method, batch, world, group, args.dim, dtype, args.repeats)
                    except torch.OutOfMemoryError:
                        row = {"method": method, "b": batch, "world": world, "global_batch": global_batch,
                               "dtype": str(dtype), "error": "out of memory"}
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bf16 GPU training throughput and large-batch loss memory.")
    parser.add_argument("--shards", nargs="*", help="training tars (default: synthetic shards written first)")
    parser.add_argument("--model", default="ViT-B-16", help="model for the throughput run (default: ViT-B-16)")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step for --model (default: 256)")
    parser.add_argument("--steps", type=int, default=80, help="steps for --model (default: 80)")
    parser.add_argument("--workers", type=int, default=8, help="data-loader workers (default: 8)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="turn on gradient checkpointing")
    parser.add_argument("--synthetic-samples", type=int, default=20000, help="synthetic pairs when no shards are given")
    parser.add_argument("--global-batches", type=int, nargs="+", default=[32768, 65536, 131072], help="global batches W*b to emulate")
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64], help="world sizes W to emulate")
    parser.add_argument("--group", type=int, default=8, help="GBA group size k (default: 8, one node)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding dim d (default: 1024)")
    parser.add_argument("--naive-max", type=int, default=65536, help="largest global batch for the naive loss (default: 65536)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (default: 5)")
    parser.add_argument("--skip-train", action="store_true", help="run only the loss-memory part")
    parser.add_argument("--output", help="JSON results file (default: $OUT/train_gpu.json)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("train_gpu.py: no CUDA device; nothing to measure")
        return 0
    output = args.output or (os.path.join(os.environ["OUT"], "train_gpu.json") if os.environ.get("OUT") else "train_gpu.json")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_train:
            results["train"] = train_throughput(args, Path(folder))
        results["loss_memory"] = loss_memory(args)
    Path(output).write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
