"""Scaling of pHash near-duplicate search: banded candidates vs faiss brute force.

Synthetic 64-bit codes: uniform random background plus planted clusters (a random center and
2-10 copies, each with 0..radius random bit flips). For each size the script times candidate
generation + verification + connected components (``bm6b.dedup.phash``: the same band values
and per-group verification the Beam steps use, driven by numpy in one process) and faiss
``IndexBinaryFlat`` range search. Brute force over all N queries would take hours at 10M, so
it runs on a random subset of queries and its full time is extrapolated linearly in the query
count (each query scans all N codes). Recall is measured on the pairs of that subset. With
``--beam-sizes`` it instead times the ``DedupNearImages`` Beam step on random codes, which
gives the Beam step's cost per code and band, which ``phash.PAIR_COST`` weighs against verification.

    python benchmarks/dedup_scaling.py --sizes 1000000 10000000 --radius 6 --repeats 3 1 --queries 5000
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import resource
import statistics
import time

import faiss
import numpy as np

from bm6b.dedup import phash as ph
from bm6b.dedup.config import DEFAULT_RADIUS

logger = logging.getLogger("dedup_scaling")


def planted_codes(n: int, radius: int, clustered_fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    clustered = int(n * clustered_fraction)
    position = 0
    while position < clustered:
        size = int(rng.integers(3, 12))
        center = codes[position]
        for member in range(position + 1, min(position + size, n)):
            flips = rng.choice(64, size=int(rng.integers(0, radius + 1)), replace=False)
            mask = np.uint64(0)
            for bit in flips:
                mask |= np.uint64(1) << np.uint64(int(bit))
            codes[member] = center ^ mask
        position += size
    return rng.permutation(codes)


_WORKER_STATE: dict = {}


def _band_worker(bands: list[int]) -> np.ndarray:
    # One faiss thread per worker process, so that the workers together use the cores given.
    faiss.omp_set_num_threads(1)
    codes, scheme = _WORKER_STATE["codes"], _WORKER_STATE["scheme"]
    found = np.empty(0, dtype=np.uint64)
    pending = []
    pending_size = 0
    for rows, cols in ph.candidate_pairs(codes, scheme, bands):
        pending.append(pair_keys(rows, cols))
        pending_size += len(pending[-1])
        # Most pairs recur in many tables. Merging once the pending pairs outnumber the distinct
        # ones keeps a worker near two copies of its distinct pairs instead of one per table.
        if pending_size >= max(len(found), 1 << 20):
            found = ph.sorted_unique(np.concatenate([found, *pending]))
            pending = []
            pending_size = 0
    return ph.sorted_unique(np.concatenate([found, *pending]))


def cpu_seconds() -> float:
    """Return CPU seconds used by this process and its finished children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_banded(codes: np.ndarray, scheme: ph.BandScheme, workers: int):
    """Find pairs with ``workers`` processes, each taking every ``workers``-th band, like Beam workers would."""
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    _WORKER_STATE.update(codes=codes, scheme=scheme)
    band_sets = [list(range(w, len(scheme.bands), workers)) for w in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        keys = ph.sorted_unique(np.concatenate(pool.map(_band_worker, band_sets)))
    rows = (keys >> np.uint64(32)).astype(np.int64)
    cols = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    pairs_found = time.perf_counter()
    labels = ph.pairs_to_components(len(codes), [(rows, cols)])
    finished = time.perf_counter()
    return rows, cols, labels, pairs_found - started, finished - started, cpu_seconds() - cpu_started


def run_brute_force(codes: np.ndarray, radius: int, queries: np.ndarray):
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    rows_list, cols_list = [], []
    for rows, cols in ph.brute_force_pairs(codes, radius, queries):
        rows_list.append(rows)
        cols_list.append(cols)
    elapsed = time.perf_counter() - started
    return np.concatenate(rows_list), np.concatenate(cols_list), elapsed, cpu_seconds() - cpu_started


def pair_keys(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    low, high = np.minimum(rows, cols).astype(np.uint64), np.maximum(rows, cols).astype(np.uint64)
    return ph.sorted_unique((low << np.uint64(32)) | high)


def measure(n: int, radius: int, candidates: str, bits: int | None, queries: int, repeats: int, seed: int,
            workers: int) -> dict:
    codes = planted_codes(n, radius, clustered_fraction=0.2, seed=seed)
    scheme = ph.make_scheme(radius, candidates, count=n, bits=bits, pair_cost=ph.PAIR_COST)
    banded_times, pair_times, banded_cpu = [], [], []
    for _ in range(repeats):
        rows, cols, labels, pair_time, total_time, cpu_time = run_banded(codes, scheme, workers)
        banded_times.append(total_time)
        pair_times.append(pair_time)
        banded_cpu.append(cpu_time)

    query_ids = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(queries, n), replace=False))
    brute_times, brute_cpu = [], []
    for _ in range(repeats):
        brute_rows, brute_cols, brute_time, cpu_time = run_brute_force(codes, radius, query_ids)
        brute_times.append(brute_time)
        brute_cpu.append(cpu_time)

    # Recall on the pairs that have a subset query as one endpoint.
    in_subset = np.zeros(n, dtype=bool)
    in_subset[query_ids] = True
    reference = pair_keys(brute_rows, brute_cols)
    mask = in_subset[rows] | in_subset[cols]
    found = pair_keys(rows[mask], cols[mask])
    pair_recall = float(np.isin(reference, found).mean()) if len(reference) else 1.0
    # Component recall: reference pairs whose ends got the same cluster label.
    ref_low = (reference >> np.uint64(32)).astype(np.int64)
    ref_high = (reference & np.uint64(0xFFFFFFFF)).astype(np.int64)
    component_recall = float((labels[ref_low] == labels[ref_high]).mean()) if len(reference) else 1.0
    # Precision: every reported pair must be within the radius (verification is exact).
    distances = np.bitwise_count(codes[rows] ^ codes[cols])
    brute_full = statistics.median(brute_times) * n / len(query_ids)
    banded = statistics.median(banded_times)
    return {
        "n": n,
        "radius": radius,
        "candidates": candidates,
        "scheme": "pigeonhole" if scheme.exact else "sampled",
        "tables": len(scheme.bands),
        "bits_per_table": sorted({len(b) for b in scheme.bands}),
        "workers": workers,
        "faiss_threads": faiss.omp_get_max_threads(),
        "banded_s": round(banded, 2),
        "banded_pairs_s": round(statistics.median(pair_times), 2),
        "banded_runs_s": [round(t, 2) for t in banded_times],
        "brute_queries": len(query_ids),
        "brute_subset_s": round(statistics.median(brute_times), 2),
        "brute_full_s_extrapolated": round(brute_full, 1),
        "speedup": round(brute_full / banded, 1),
        "banded_cpu_s": round(statistics.median(banded_cpu), 1),
        "brute_full_cpu_s_extrapolated": round(statistics.median(brute_cpu) * n / len(query_ids), 1),
        "speedup_cpu": round(statistics.median(brute_cpu) * n / len(query_ids) / statistics.median(banded_cpu), 1),
        "pairs_found": int(len(pair_keys(rows, cols))),
        "reference_pairs_in_subset": int(len(reference)),
        "pair_recall": round(pair_recall, 5),
        "component_recall": round(component_recall, 5),
        "max_distance_reported": int(distances.max()) if len(distances) else None,
        "clustered_nodes": int((labels != np.arange(n)).sum()),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # Largest finished worker so far (sizes run in the order given), counting the codes it
        # shares with the parent through fork.
        "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def measure_beam(n: int, radius: int, candidates: str, seed: int) -> dict:
    """Time ``DedupNearImages`` on ``n`` uniform random codes on the in-process FnApiRunner."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from bm6b.dedup import DedupNearImages
    from bm6b.schemas import new_record

    codes = np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    records = []
    for index, code in enumerate(codes.tolist()):
        record = new_record(key=f"{index:016x}", uid=f"{index:032x}", url=f"http://127.0.0.1/{index}.jpg",
                            source="random", source_row=index, caption_en="a")
        record["phash"] = code
        records.append(record)
    started = time.perf_counter()
    # The FnApiRunner runs the pipeline in this process, so RUSAGE_SELF covers its work.
    cpu_started = cpu_seconds()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        out = pipeline | beam.Create(records, reshuffle=False) | DedupNearImages(radius=radius, candidates=candidates)
        _ = out.records | beam.combiners.Count.Globally()
    scheme = ph.make_scheme(radius, candidates, count=n)
    return {
        "beam_n": n,
        "radius": radius,
        "candidates": candidates,
        "scheme": "pigeonhole" if scheme.exact else "sampled",
        "tables": len(scheme.bands),
        "beam_s": round(time.perf_counter() - started, 2),
        "beam_cpu_s": round(cpu_seconds() - cpu_started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--radius", type=int, default=DEFAULT_RADIUS)
    parser.add_argument("--candidates", nargs="+", default=["auto"], choices=list(ph.CANDIDATE_SCHEMES))
    parser.add_argument("--bits", type=int, default=None,
                        help="bits per table of the sampled scheme (default: round(log2 N) + 2, see sampled_bits_for)")
    parser.add_argument("--queries", type=int, default=20_000, help="brute-force query subset size")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="runs per size (one value, or one per size); the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=faiss.omp_get_max_threads(),
                        help="processes for the banded search (default: faiss's thread count, for equal cores)")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[],
                        help="instead, time the DedupNearImages Beam step on this many random codes")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logger.info("faiss threads: %d", faiss.omp_get_max_threads())

    results = []
    if args.beam_sizes:
        for candidates in args.candidates:
            for n in args.beam_sizes:
                result = measure_beam(n, args.radius, candidates, args.seed)
                logger.info("%s", json.dumps(result))
                results.append(result)
        args.sizes = []
    repeats = args.repeats * len(args.sizes) if len(args.repeats) == 1 else args.repeats
    for candidates in args.candidates:
        for n, size_repeats in zip(args.sizes, repeats):
            result = measure(n, args.radius, candidates, args.bits, args.queries, size_repeats, args.seed,
                             args.workers)
            logger.info("%s", json.dumps(result))
            results.append(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
