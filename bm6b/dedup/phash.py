"""Near-duplicate search over 64-bit pHash codes: candidate bands, verification, clustering.

Candidate generation groups codes by (band, band value). Two schemes exist, and ``auto`` picks one:

* ``pigeonhole`` (exact): the 64 bits are cut into ``radius + 1`` contiguous bands. Two codes
  within Hamming distance ``radius`` differ in at most ``radius`` bits, so at least one band
  is equal in both and the pair meets in that band's group. Groups hold about
  ``N / 2 ** (64 / (radius + 1))`` random codes, so the work grows with ``N ** 2`` at large N.
* ``sampled`` (approximate): ``tables`` groups of ``bits`` randomly chosen bit positions (bit
  sampling LSH). A pair at distance d collides in one table with probability
  ``C(64 - d, bits) / C(64, bits)``. The table count is chosen so that a pair at exactly
  ``radius`` is found with probability ``target_recall``. ``sampled_bits_for`` ties ``bits``
  to ``log2 N``, so a code shares its group with 0.18-0.35 random codes on average at any N. The tables
  then grow by about 1.6x per 10x codes (radius 6: 64 tables of 22 bits at 1M, 104 of 25 bits
  at 10M), and the work with N times the table count: 16.5x from 1M to 10M codes in
  ``benchmarks/dedup_scaling.py``, about N ** 1.22, against N ** 2 for brute force. In one
  process it is steeper past 10M (N ** 1.4 to 30M), where each table sorts hundreds of MB.
* ``auto`` (the default): ``auto_scheme`` keeps pigeonhole while its estimated work stays within
  ``EXACT_WORK_FACTOR`` times that of the sampled tables for the same N. At radius 6 it switches
  to sampled between 500,000 and 700,000 codes, in memory (``candidate_pairs``) and in the
  Beam step alike, since both verify a pair for a small fraction of a band value's cost.

Inside a group every pair of codes with equal band values is verified by popcount (numpy for
small groups, a faiss ``IndexBinaryFlat`` range search in query chunks for large ones). In the
Beam step (``band_chunks`` and ``group_code_edges``), a group is one part of one band's values,
about ``GROUP_CODES`` distinct codes, and only a star forest of its verified pairs leaves it:
at most G - 1 edges for G codes, even when every pair matches. It holds O(G) codes plus one
query chunk of results.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Sequence

import numpy as np

HASH_BITS = 64

# Groups with at least this many distinct codes are verified with faiss instead of numpy pairs:
# with one thread, faiss 1.15 costs 2.9 ns per pair at 256 codes and 1.3 at 2,048, numpy about 7.5.
FAISS_MIN_GROUP = 256
# Query rows per faiss range search, at most; a chunk covers at most FAISS_MAX_RESULTS candidate
# pairs, so a group whose codes all match keeps about 200 MB of results in memory at a time.
FAISS_QUERY_CHUNK = 4096
FAISS_MAX_RESULTS = 1 << 24


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclasses.dataclass(frozen=True)
class BandScheme:
    """A list of bands; each band is the tuple of bit positions (0 = least significant) it reads."""

    radius: int
    bands: tuple[tuple[int, ...], ...]
    exact: bool

    def __post_init__(self):
        # One 256-entry lookup table per (band, byte): OR-ing 8 lookups gives the band value.
        tables = np.zeros((len(self.bands), 8, 256), dtype=np.uint64)
        for band_index, positions in enumerate(self.bands):
            for out_bit, position in enumerate(positions):
                byte, bit = divmod(position, 8)
                values = np.arange(256)
                tables[band_index, byte] |= (((values >> bit) & 1) << out_bit).astype(np.uint64)
        object.__setattr__(self, "_tables", tables)
        # Narrower lookup tables halve the memory traffic of the array path when bands fit 32 bits.
        narrow = tables.astype(np.uint32) if max(len(b) for b in self.bands) <= 32 else tables
        object.__setattr__(self, "_array_tables", narrow)

    def band_values(self, code: int) -> list[int]:
        """Return the value of every band for one code."""
        code_bytes = int(code).to_bytes(8, "little")
        tables = self._tables
        return [
            int(
                tables[b, 0, code_bytes[0]] | tables[b, 1, code_bytes[1]] | tables[b, 2, code_bytes[2]]
                | tables[b, 3, code_bytes[3]] | tables[b, 4, code_bytes[4]] | tables[b, 5, code_bytes[5]]
                | tables[b, 6, code_bytes[6]] | tables[b, 7, code_bytes[7]]
            )
            for b in range(len(self.bands))
        ]

    def band_values_array(self, codes: np.ndarray, band: int) -> np.ndarray:
        """Return one band's values (uint32 when every band has at most 32 bits) for an array of uint64 codes."""
        # Four lookups in 65,536-entry tables (built from pairs of byte tables) instead of eight.
        words = np.ascontiguousarray(codes, dtype="<u8").view("<u2").reshape(-1, 4)
        table = self._array_tables[band]
        values = None
        for word in range(4):
            low, high = table[2 * word], table[2 * word + 1]
            word_table = (low[None, :] | high[:, None]).ravel()
            part = word_table[words[:, word]]
            values = part if values is None else values | part
        return values


def pigeonhole_scheme(radius: int) -> BandScheme:
    """Cut 64 bits into ``radius + 1`` contiguous bands of near-equal width (exact for ``radius``)."""
    check_radius(radius)
    count = radius + 1
    bands = []
    start = 0
    for index in range(count):
        width = HASH_BITS // count + (1 if index < HASH_BITS % count else 0)
        bands.append(tuple(range(start, start + width)))
        start += width
    return BandScheme(radius, tuple(bands), exact=True)


def collision_probability(distance: int, bits: int) -> float:
    """Probability that ``bits`` sampled positions avoid all ``distance`` differing bits."""
    return math.comb(HASH_BITS - distance, bits) / math.comb(HASH_BITS, bits)


def sampled_scheme(radius: int, bits: int, target_recall: float = 0.99, seed: int = 0) -> BandScheme:
    """Bit-sampling LSH tables of ``bits`` positions, enough to find a pair at ``radius`` with ``target_recall``.

    Positions are drawn without replacement within a table and independently across tables,
    from a fixed seed so that every worker builds the same tables.
    """
    check_radius(radius)
    if not 1 <= bits <= HASH_BITS - radius:
        raise ValueError(f"invalid bits per table {bits}: expected 1..{HASH_BITS - radius} for radius {radius}")
    if not 0 < target_recall < 1:
        raise ValueError(f"invalid target recall {target_recall}: expected a value between 0 and 1")
    p = collision_probability(radius, bits)
    if p >= 1.0:
        # Radius 0: codes within the radius are equal, so they meet in every table.
        tables = 1
    else:
        tables = max(1, math.ceil(math.log(1 - target_recall) / math.log(1 - p)))
    rng = np.random.default_rng(seed)
    bands = tuple(tuple(sorted(int(i) for i in rng.choice(HASH_BITS, size=bits, replace=False))) for _ in range(tables))
    return BandScheme(radius, bands, exact=False)


CANDIDATE_SCHEMES = ("auto", "pigeonhole", "sampled")
# A sampled table gets round(log2 N) + AUTO_EXTRA_BITS bits, so a random code shares its band
# value with 2 ** (-AUTO_EXTRA_BITS +- 0.5) other codes on average. More bits cost more tables
# (about 1.17x per bit at radius 6), fewer bits cost quadratic bucket collisions.
AUTO_EXTRA_BITS = 2
# Band values are computed as uint32 in the array path and sorted as (value << 32 | index).
MAX_SAMPLED_BITS = 32
# ``auto`` keeps the exact pigeonhole scheme unless its estimated work exceeds this many times
# that of the sampled tables.
EXACT_WORK_FACTOR = 2
# Cost of verifying one candidate pair, in units of the cost of one code's value in one band.
# In memory (numpy 2.4 and faiss 1.15 on 2 vCPUs): about 60 ns per code and band at 1M codes,
# 1.5 ns per pair in faiss-verified groups. The Beam step runs the same numpy code on chunks. On
# the in-process runner its extra cost per code and band was below the noise of a 200,000-code
# run (under 0.2 us), so one weight serves both.
PAIR_COST = 0.03


def sampled_bits_for(count: int, radius: int) -> int:
    """Return the bits per sampled table for ``count`` codes: ``round(log2 count) + AUTO_EXTRA_BITS``, clipped."""
    check_radius(radius)
    bits = round(math.log2(max(count, 2))) + AUTO_EXTRA_BITS
    return max(1, min(bits, HASH_BITS - radius, MAX_SAMPLED_BITS))


def estimated_work(scheme: BandScheme, count: int, pair_cost: float) -> float:
    """Estimate the work of a scheme on ``count`` random codes, in units of one code's value in one band.

    Each band computes one value per code and verifies the pairs that share a value: about
    ``count ** 2 / 2 ** (width + 1)`` pairs for uniform random codes, each costing ``pair_cost``.
    """
    return sum(count + pair_cost * count * (count - 1) / 2 ** (len(band) + 1) for band in scheme.bands)


def auto_scheme(radius: int, count: int, pair_cost: float, target_recall: float = 0.99) -> BandScheme:
    """Pick pigeonhole for ``count`` codes unless its estimated work exceeds ``EXACT_WORK_FACTOR`` x sampled's."""
    exact = pigeonhole_scheme(radius)
    sampled = sampled_scheme(radius, sampled_bits_for(count, radius), target_recall)
    if estimated_work(exact, count, pair_cost) <= EXACT_WORK_FACTOR * estimated_work(sampled, count, pair_cost):
        return exact
    return sampled


def make_scheme(radius: int, candidates: str = "auto", count: int | None = None, bits: int | None = None,
                pair_cost: float = PAIR_COST, target_recall: float = 0.99) -> BandScheme:
    """Build the candidate scheme named ``candidates`` for ``count`` codes.

    ``auto`` and ``sampled`` without ``bits`` need ``count`` (the number of codes searched).
    ``pair_cost`` weighs verification against band values for ``auto``.
    """
    if candidates not in CANDIDATE_SCHEMES:
        raise ValueError(f"unknown candidate scheme {candidates!r}; expected one of {', '.join(CANDIDATE_SCHEMES)}")
    if candidates == "pigeonhole":
        return pigeonhole_scheme(radius)
    if candidates == "sampled" and bits is not None:
        return sampled_scheme(radius, bits, target_recall)
    if count is None:
        raise ValueError(f"candidate scheme {candidates!r} needs the number of codes (or bits for 'sampled')")
    if candidates == "sampled":
        return sampled_scheme(radius, sampled_bits_for(count, radius), target_recall)
    return auto_scheme(radius, count, pair_cost, target_recall)


def check_radius(radius: int) -> None:
    if not 0 <= radius < HASH_BITS // 2:
        raise ValueError(f"invalid pHash radius {radius}: expected 0..{HASH_BITS // 2 - 1} bits")


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Return the distinct values of an integer array, sorted.

    The same result as ``np.unique``, which in numpy 2.4 takes about 25 times longer on a
    million uint64 values (0.8 s against 0.03 s here).
    """
    ordered = np.sort(np.asarray(values))
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def to_faiss_codes(codes: np.ndarray) -> np.ndarray:
    """Pack uint64 codes as the (n, 8) uint8 rows faiss binary indexes take, most significant byte first."""
    return np.ascontiguousarray(np.asarray(codes, dtype=">u8")).view(np.uint8).reshape(-1, 8)


class UnionFind:
    def __init__(self, size: int):
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        parent = self.parent
        root = item
        while parent[root] != root:
            root = parent[root]
        while parent[item] != root:
            parent[item], item = root, parent[item]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra < rb:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb
        return True


def _numpy_pairs(codes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = len(codes)
    for start in range(0, n, 512):
        block = codes[start : start + 512]
        distances = np.bitwise_count(block[:, None] ^ codes[None, :])
        rows, cols = np.nonzero(distances <= radius)
        rows = rows + start
        upper = cols > rows
        yield rows[upper], cols[upper]


def _faiss_pairs(codes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import faiss

    packed = to_faiss_codes(codes)
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(packed)
    chunk = max(1, min(FAISS_QUERY_CHUNK, FAISS_MAX_RESULTS // len(codes)))
    for start in range(0, len(codes), chunk):
        # faiss returns distances strictly below the given radius.
        limits, _, labels = index.range_search(packed[start : start + chunk], radius + 1)
        rows = np.repeat(np.arange(len(limits) - 1) + start, np.diff(limits).astype(np.int64))
        upper = labels > rows
        yield rows[upper], labels[upper]


def verified_pairs(codes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield chunks of index pairs (i < j) of distinct codes within ``radius``."""
    if len(codes) < 2:
        return
    if len(codes) >= FAISS_MIN_GROUP:
        yield from _faiss_pairs(codes, radius)
    else:
        yield from _numpy_pairs(codes, radius)


def pairs_to_components(size: int, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Return the component label (smallest member index) of each of ``size`` items, in memory.

    The single-process reference for benchmarks and tests (scipy's connected components); the
    pipeline uses the distributed components in ``bm6b.dedup.components``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    chunks = list(pairs)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in chunks]) if chunks else np.empty(0, np.int64)
    cols = np.concatenate([np.asarray(c, dtype=np.int64) for _, c in chunks]) if chunks else np.empty(0, np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1 if size else 0, size, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(size))
    return smallest[component]


def candidate_pairs(
    codes: np.ndarray, scheme: BandScheme, bands: Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield verified (i, j) index pairs of ``codes`` in one process, band by band.

    The single-process twin of the pipeline's band step, for benchmarks and tests: it sorts
    each band's values and verifies every group of equal values, and may yield a pair once per
    band in which it collides. ``bands`` restricts the work to some band indices.
    """
    codes = np.asarray(codes, dtype=np.uint64)
    for band in range(len(scheme.bands)) if bands is None else bands:
        values = scheme.band_values_array(codes, band)
        yield from _verified_collisions(codes, values, scheme.radius)


def _verified_collisions(codes: np.ndarray, values: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (i, j) index pairs of ``codes`` that share a band value and lie within ``radius``."""
    order, sorted_values = _sort_by_value(values, 32 if values.dtype.itemsize <= 4 else HASH_BITS)

    # Keep only the codes that share their value with a neighbor in sorted order.
    same = sorted_values[1:] == sorted_values[:-1]
    shared = np.zeros(len(order), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    order, sorted_values = order[shared], sorted_values[shared]
    if not len(order):
        return

    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    yield from _pairs_in_groups(codes, order, starts, sizes, radius)


# The Beam band step splits each band's values into parts, so that a (band, part) group contains
# about this many distinct codes: 12 MB of codes and band values.
GROUP_CODES = 1 << 20


def band_parts(count: int) -> int:
    """Return how many parts each band is split into for ``count`` distinct codes."""
    return max(1, math.ceil(count / GROUP_CODES))


def part_of(values: np.ndarray, parts: int) -> np.ndarray:
    """Return the part (0 .. parts - 1) of each band value; equal values always share a part."""
    # Multiplicative hashing spreads the values evenly whatever bits the band reads.
    mixed = values.astype(np.uint64) * np.uint64(0x9E37_79B9_7F4A_7C15)
    return ((mixed >> np.uint64(40)) % np.uint64(parts)).astype(np.int64)


def band_chunks(scheme: BandScheme, codes: np.ndarray, parts: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield (band, part, codes, band values) for every band of ``scheme`` and every part that has codes."""
    codes = np.asarray(codes, dtype=np.uint64)
    for band in range(len(scheme.bands)):
        values = scheme.band_values_array(codes, band)
        if parts == 1:
            yield band, 0, codes, values
            continue
        part = part_of(values, parts)
        order = np.argsort(part, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(part, minlength=parts))]
        for index in np.flatnonzero(bounds[1:] > bounds[:-1]):
            members = order[bounds[index] : bounds[index + 1]]
            yield band, int(index), codes[members], values[members]


def group_code_edges(codes: np.ndarray, values: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Return edges (code, root code) of a star forest over the codes of one (band, part) group.

    Codes that share a band value and lie within ``radius`` are joined, and each joined code
    gets one edge to the smallest code of its local component. A group of G distinct codes
    therefore sends at most G - 1 edges downstream, even when every pair matches.
    """
    order = np.argsort(np.asarray(codes, dtype=np.uint64))
    codes, values = np.asarray(codes, dtype=np.uint64)[order], np.asarray(values)[order]
    distinct = np.r_[True, codes[1:] != codes[:-1]]
    codes, values = codes[distinct], values[distinct]
    pairs = [chunk for chunk in _verified_collisions(codes, values, radius) if len(chunk[0])]
    if not pairs:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    labels = pairs_to_components(len(codes), pairs)
    joined = np.flatnonzero(labels != np.arange(len(codes)))
    return codes[joined], codes[labels[joined]]


def _sort_by_value(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices, values) of ``values`` sorted by value, ties by index."""
    if width <= 32 and len(values) < 1 << 32:
        # Sorting one uint64 array of (value << 32 | index) is several times faster than a
        # stable argsort (numpy 2.4 sorts 64-bit integers with SIMD).
        keys = np.sort((values.astype(np.uint64) << np.uint64(32)) | np.arange(len(values), dtype=np.uint64))
        return (keys & np.uint64(0xFFFF_FFFF)).astype(np.int64), keys >> np.uint64(32)
    order = np.argsort(values, kind="stable")
    return order, values[order]


def _pairs_in_groups(codes, order, starts, sizes, radius) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # Groups of equal size are verified together as one (groups, size, size) array.
    for size in sorted_unique(sizes):
        group_starts = starts[sizes == size]
        if size * size * len(group_starts) <= 1 << 24 and size < FAISS_MIN_GROUP:
            for chunk in range(0, len(group_starts), max(1, (1 << 22) // int(size * size))):
                chunk_starts = group_starts[chunk : chunk + max(1, (1 << 22) // int(size * size))]
                members = order[chunk_starts[:, None] + np.arange(size)[None, :]]
                member_codes = codes[members]
                distances = np.bitwise_count(member_codes[:, :, None] ^ member_codes[:, None, :])
                g, i, j = np.nonzero(np.triu(distances <= radius, k=1))
                yield members[g, i], members[g, j]
        else:
            for start in group_starts:
                members = order[start : start + size]
                for rows, cols in verified_pairs(codes[members], radius):
                    yield members[rows], members[cols]


def brute_force_pairs(codes: np.ndarray, radius: int, queries: Sequence[int] | None = None):
    """Yield all (i, j), i < j, within ``radius`` with faiss ``IndexBinaryFlat`` range search.

    With ``queries`` (indices), only pairs whose first item is a query are searched, for
    measuring brute force on a subset.
    """
    import faiss

    packed = to_faiss_codes(codes)
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(packed)
    query_ids = np.arange(len(codes)) if queries is None else np.asarray(queries)
    for start in range(0, len(query_ids), 65536):
        chunk = query_ids[start : start + 65536]
        limits, _, labels = index.range_search(packed[chunk], radius + 1)
        rows = np.repeat(chunk, np.diff(limits).astype(np.int64))
        keep = labels != rows
        yield rows[keep], labels[keep]
