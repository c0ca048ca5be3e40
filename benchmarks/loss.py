"""Benchmark distributed contrastive losses on W gloo processes: bytes moved, retained memory, step time.

Methods, all behind the same step (linear image and text towers, loss, backward):
- ``naive``: open_clip ``ClipLoss()``: gather without gradient, full (W*b)^2 logits on every rank.
- ``local``: open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``: exact, b x W*b logits.
- ``siglip``: open_clip ``SigLipLoss(dist_impl="bidir")``: sigmoid loss, text features travel a ring.
- ``gba_k{k}_m{m}``: bm6b's grouped ITC loss with groups of k ranks and m accumulated micro-batches.

Bytes are *logical* bytes received per rank per optimizer step, averaged over ranks. Every
torch.distributed call is wrapped for the run and its bytes are attributed to the sending rank, so
they split into traffic inside and across virtual nodes of g consecutive ranks, for any g. Ring
all-reduce and reduce-scatter are counted with their textbook volumes. Retained memory is the sum of unique
storages that the loss saves for backward (``saved_tensors_hooks``); for m > 1 the GradCache
feature cache (features and their gradients) is reported separately.

Run: ``python benchmarks/loss.py --worlds 2 4 8 --batch 128 --dim 256 --output loss.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

INPUT_DIM = 64
VIRTUAL_NODE_SIZES = (1, 2, 4)


class CommCounter:
    """Wraps torch.distributed collectives and records logical bytes received, per phase and sender."""

    WRAPPED = (
        "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
        "all_reduce", "all_to_all", "batch_isend_irecv", "broadcast", "scatter",
    )

    def __init__(self, rank: int):
        self.rank = rank
        self.phase = "forward"
        self.received: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.originals = {}

    def install(self) -> None:
        for name in self.WRAPPED:
            original = getattr(dist, name)
            self.originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def reset(self) -> None:
        self.received.clear()

    def _members(self, group) -> list[int]:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)

    def _add(self, source: int, nbytes: int) -> None:
        if source != self.rank:
            self.received[self.phase][source] += nbytes

    def _wrap(self, name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self._count(name, args, kwargs)
            return original(*args, **kwargs)

        return wrapper

    def _count(self, name, args, kwargs) -> None:
        group = kwargs.get("group")
        if name == "batch_isend_irecv":
            for op in args[0]:
                if getattr(op.op, "__name__", "") == "irecv":
                    self._add(op.peer, op.tensor.nbytes)
            return
        members = self._members(group)
        size = len(members)
        if name == "all_gather":
            for source, tensor in zip(members, args[0]):
                self._add(source, tensor.nbytes)
        elif name == "all_gather_into_tensor":
            for source in members:
                self._add(source, args[1].nbytes)
        elif name in ("reduce_scatter_tensor", "reduce_scatter"):
            for source in members:
                self._add(source, args[0].nbytes)
        elif name == "all_reduce":
            # Ring all-reduce: 2(n-1)/n of the tensor arrives, an equal share from each other rank.
            for source in members:
                self._add(source, 2 * args[0].nbytes // size)
        elif name == "all_to_all":
            for source, tensor in zip(members, args[0]):
                self._add(source, tensor.nbytes)
        elif name == "scatter":
            # torch.distributed.nn.all_gather's backward on gloo: one scatter per rank of the group.
            source = kwargs.get("src", args[2] if len(args) > 2 else 0)
            self._add(source, args[0].nbytes)
        elif name == "broadcast":
            source = kwargs.get("src", args[1] if len(args) > 1 else 0)
            self._add(source, args[0].nbytes)

    def split(self, phase: str, node_size: int) -> tuple[int, int]:
        intra = inter = 0
        for source, nbytes in self.received.get(phase, {}).items():
            if source // node_size == self.rank // node_size:
                intra += nbytes
            else:
                inter += nbytes
        return intra, inter


class SavedBytes:
    """Sums unique storages saved for backward while active."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class MeasuredLoss(nn.Module):
    """Runs a loss under saved-tensor accounting; ``saved`` is the last call's retained bytes."""

    def __init__(self, loss, counter: CommCounter, with_bias: bool = False):
        super().__init__()
        self.loss = loss
        self.counter = counter
        self.with_bias = with_bias
        self.bias = None
        self.saved = 0

    def forward(self, image_features, text_features, logit_scale):
        accounting = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(accounting.pack, lambda t: t):
            if self.with_bias:
                value = self.loss(image_features, text_features, logit_scale, self.bias)
            else:
                value = self.loss(image_features, text_features, logit_scale)
        self.saved = accounting.total
        return value


class ToyTowers(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.image = nn.Linear(INPUT_DIM, dim, dtype=dtype)
        self.text = nn.Linear(INPUT_DIM, dim, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=dtype))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0, dtype=dtype))

    def forward(self, images, texts):
        return {
            "image_features": F.normalize(self.image(images), dim=-1),
            "text_features": F.normalize(self.text(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def methods_for(world: int) -> list[dict]:
    methods = [{"name": "naive", "m": 1}, {"name": "local", "m": 1}, {"name": "siglip", "m": 1}]
    for k in sorted({1, 2, max(world // 2, 1), world}):
        if world % k == 0:
            for m in (1, 2):
                methods.append({"name": f"gba_k{k}_m{m}", "k": k, "m": m})
    return methods


def _make_loss(method: dict, rank: int, world: int, counter: CommCounter):
    from open_clip.loss import ClipLoss, SigLipLoss

    from bm6b.train.loss import GroupedClipLoss, new_itc_group

    name = method["name"]
    if name == "naive":
        return MeasuredLoss(ClipLoss(rank=rank, world_size=world), counter)
    if name == "local":
        return MeasuredLoss(ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world), counter)
    if name == "siglip":
        return MeasuredLoss(SigLipLoss(rank=rank, world_size=world, dist_impl="bidir"), counter, with_bias=True)
    return MeasuredLoss(GroupedClipLoss(new_itc_group(method["k"])), counter)


def _run_method(method, rank, world, args, counter, dtype):
    from bm6b.train.step import contrastive_step

    torch.manual_seed(0)
    model = ToyTowers(args.dim, dtype)
    loss = _make_loss(method, rank, world, counter)
    loss.bias = model.logit_bias
    generator = torch.Generator().manual_seed(1000 * rank + 7)
    micro = method["m"]

    def batches():
        return [
            (torch.randn(args.batch, INPUT_DIM, generator=generator, dtype=dtype),
             torch.randn(args.batch, INPUT_DIM, generator=generator, dtype=dtype))
            for _ in range(micro)
        ]

    wall, cpu = [], []
    loss_value = None
    for step in range(args.warmup + args.steps):
        data = batches()
        counter.reset()
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        if method["name"].startswith("gba"):
            result = _contrastive_step_counted(contrastive_step, model, data, loss, counter)
            loss_value = result
        else:
            counter.phase = "forward"
            out = model(*data[0])
            value = loss(out["image_features"], out["text_features"], out["logit_scale"])
            counter.phase = "backward"
            value.backward()
            loss_value = value.detach()
        if step >= args.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)

    counter.phase = "reporting"  # the loss all-reduce below is not part of the step
    mean_loss = loss_value.clone().double()
    dist.all_reduce(mean_loss)
    row = {
        "method": method["name"],
        "k": method.get("k", world),
        "m": micro,
        "samples_per_rank_step": micro * args.batch,
        "negatives_per_sample": _negatives(method, world, args.batch),
        "loss": (mean_loss / world).item(),
        "retained_loss_bytes": loss.saved,
        "feature_cache_bytes": 4 * micro * args.batch * args.dim * _itemsize(dtype) if micro > 1 else 0,
        "step_ms": 1000 * statistics.median(wall),
        "cpu_ms": 1000 * statistics.median(cpu),
    }
    for phase in ("forward", "backward"):
        for node_size in VIRTUAL_NODE_SIZES:
            intra, inter = counter.split(phase, node_size)
            row[f"{phase}_intra_g{node_size}"] = intra
            row[f"{phase}_inter_g{node_size}"] = inter
    return row


def _contrastive_step_counted(contrastive_step, model, data, loss, counter):
    # GradCache calls the loss's backward before the re-encode, so label collectives by autograd state.
    counter.phase = "forward"
    original_forward = loss.forward

    def forward(*args):
        counter.phase = "forward"
        value = original_forward(*args)
        return _PhaseMarker.apply(value, counter)

    loss.forward = forward
    try:
        result = contrastive_step(model, data, loss)
    finally:
        loss.forward = original_forward
    return result.loss


class _PhaseMarker(torch.autograd.Function):
    """Identity whose backward switches the byte counter to the backward phase."""

    @staticmethod
    def forward(ctx, value, counter):
        ctx.counter = counter
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.phase = "backward"
        return grad, None


def _negatives(method, world, batch) -> int:
    if method["name"] in ("naive", "local", "siglip"):
        return world * batch - 1
    return method["k"] * method["m"] * batch - 1


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _worker(rank, world, store, args, queue_path):
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    counter = CommCounter(rank)

    rows = []
    for method in methods_for(world):
        if method["name"] == "naive" and world * args.batch > args.naive_max:
            continue
        counter.install()
        try:
            row = _run_method(method, rank, world, args, counter, dtype)
        finally:
            counter.uninstall()

        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        if rank == 0:
            merged = dict(gathered[0])
            merged["world"] = world
            merged["step_ms"] = max(r["step_ms"] for r in gathered)  # the slowest rank sets the pace
            merged["cpu_ms"] = max(r["cpu_ms"] for r in gathered)
            # Ring methods receive different intra/inter splits on different ranks, so report the mean.
            for key in gathered[0]:
                if key.startswith(("forward_", "backward_")):
                    merged[key] = sum(r[key] for r in gathered) / world
            rows.append(merged)
    if rank == 0:
        with open(queue_path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle)
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> list[dict]:
    os.environ["OMP_NUM_THREADS"] = "1"
    rows: list[dict] = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            result_path = os.path.join(folder, "rows.json")
            mp.spawn(_worker, args=(world, os.path.join(folder, "store"), args, result_path), nprocs=world, join=True)
            with open(result_path, encoding="utf-8") as handle:
                rows.extend(json.load(handle))
    return rows


def _kib(value: int) -> str:
    return f"{value / 1024:.0f}"


def format_table(rows: list[dict], node_size: int) -> str:
    lines = [
        f"| W | method | k | m | negatives | fwd intra KiB | fwd inter KiB | bwd intra KiB | bwd inter KiB "
        f"| retained loss KiB | feature cache KiB | step ms | CPU ms | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['world']} | {row['method']} | {row['k']} | {row['m']} | {row['negatives_per_sample']} "
            f"| {_kib(row[f'forward_intra_g{node_size}'])} | {_kib(row[f'forward_inter_g{node_size}'])} "
            f"| {_kib(row[f'backward_intra_g{node_size}'])} | {_kib(row[f'backward_inter_g{node_size}'])} "
            f"| {_kib(row['retained_loss_bytes'])} | {_kib(row['feature_cache_bytes'])} "
            f"| {row['step_ms']:.1f} | {row['cpu_ms']:.1f} | {row['loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="process counts W to run (default: 2 4 8)")
    parser.add_argument("--batch", type=int, default=128, help="pairs per rank per micro-batch b (default: 128)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension d (default: 256)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="feature dtype (default: float32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--node-size", type=int, default=2, choices=VIRTUAL_NODE_SIZES, help="virtual node size g for the printed table (default: 2)")
    parser.add_argument("--naive-max", type=int, default=2048, help="skip the naive loss above this global batch (default: 2048)")
    parser.add_argument("--output", help="write all rows as JSON here")
    args = parser.parse_args(argv)

    rows = run(args)
    print(format_table(rows, args.node_size))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
