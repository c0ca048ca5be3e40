"""pHash bands, verification and clustering, without Beam."""

from __future__ import annotations

import numpy as np
import pytest

from bm6b.dedup import phash as ph


def _pair_set(chunks) -> set[tuple[int, int]]:
    pairs = set()
    for rows, cols in chunks:
        pairs.update(zip(np.minimum(rows, cols).tolist(), np.maximum(rows, cols).tolist()))
    return pairs


def _planted_codes(n: int, radius: int, seed: int = 0) -> np.ndarray:
    """Random codes where every second code of the first 2,000 is a copy with 0..radius+2 flipped bits."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64)
    for i in range(0, min(n, 2000) - 1, 2):
        flips = rng.choice(64, size=int(rng.integers(0, radius + 3)), replace=False)
        codes[i + 1] = codes[i] ^ np.uint64(sum(1 << int(f) for f in flips))
    return codes


@pytest.mark.parametrize("radius", [0, 3, 8, 10])
def test_pigeonhole_bands_cover_bits(radius):
    scheme = ph.pigeonhole_scheme(radius)
    assert len(scheme.bands) == radius + 1
    assert sorted(bit for band in scheme.bands for bit in band) == list(range(64))
    widths = [len(band) for band in scheme.bands]
    assert max(widths) - min(widths) <= 1


def test_band_values_scalar_matches_array():
    codes = _planted_codes(100, 8)
    for scheme in (ph.pigeonhole_scheme(8), ph.sampled_scheme(8, 20)):
        for band in range(len(scheme.bands)):
            array_values = scheme.band_values_array(codes, band).tolist()
            assert array_values == [scheme.band_values(int(c))[band] for c in codes]


def test_band_value_of_known_code():
    # radius 3: four 16-bit bands, band 0 = the lowest 16 bits.
    scheme = ph.pigeonhole_scheme(3)
    assert scheme.band_values(0x0123_4567_89AB_CDEF) == [0xCDEF, 0x89AB, 0x4567, 0x0123]


def test_pigeonhole_finds_every_brute_force_pair():
    codes = _planted_codes(20_000, 8)
    found = _pair_set(ph.candidate_pairs(codes, ph.pigeonhole_scheme(8)))
    reference = _pair_set(ph.brute_force_pairs(codes, 8))
    assert len(reference) > 800
    assert found == reference


def test_sampled_scheme_recall_and_precision():
    codes = _planted_codes(20_000, 8)
    scheme = ph.sampled_scheme(8, 16, target_recall=0.99)
    found = _pair_set(ph.candidate_pairs(codes, scheme))
    reference = _pair_set(ph.brute_force_pairs(codes, 8))
    assert found <= reference
    assert len(found) >= 0.98 * len(reference)


def test_sampled_table_count_meets_target():
    scheme = ph.sampled_scheme(8, 24, target_recall=0.99)
    p = ph.collision_probability(8, 24)
    assert 1 - (1 - p) ** len(scheme.bands) >= 0.99
    assert 1 - (1 - p) ** (len(scheme.bands) - 1) < 0.99
    assert all(len(set(band)) == 24 for band in scheme.bands)


def test_collision_probability_by_hand():
    # One sampled bit avoids 8 differing bits of 64 with probability 56/64.
    assert ph.collision_probability(8, 1) == pytest.approx(56 / 64)
    assert ph.collision_probability(0, 24) == 1.0


def test_invalid_radius_rejected():
    with pytest.raises(ValueError, match="invalid pHash radius"):
        ph.pigeonhole_scheme(-1)
    with pytest.raises(ValueError, match="invalid pHash radius"):
        ph.pigeonhole_scheme(40)
    with pytest.raises(ValueError, match="unknown candidate scheme"):
        ph.make_scheme(8, "lsh")


def test_group_forest_links_equal_and_close_codes():
    members = [("a", 5), ("b", 5), ("c", 7), ("d", 1 << 40), ("e", (1 << 40) | 3)]
    edges = ph.group_forest(members, radius=1)
    # b equals a; c is one bit from a; e is two bits from d, beyond the radius.
    assert edges == [("b", "a"), ("a", "c")]


def test_group_forest_edges_stay_below_group_size():
    # 3,000 distinct codes all within radius 2 of each other: a full graph of 4.5M pairs,
    # verified with faiss (the group exceeds FAISS_MIN_GROUP), sent as a forest of n - 1 edges.
    base = 0xFFFF_0000_FFFF_0000
    members = [(f"n{i:05d}", base ^ (1 << (i % 64)) ^ (1 << ((i // 64) % 64))) for i in range(3000)]
    distinct = {code for _, code in members}
    edges = ph.group_forest(members, radius=4)
    assert len(edges) == len(members) - 1
    nodes = {n for edge in edges for n in edge}
    assert nodes == {n for n, _ in members}
    assert len(distinct) < len(members)


def test_faiss_and_numpy_verification_agree():
    codes = _planted_codes(3000, 6)
    numpy_pairs = _pair_set(ph._numpy_pairs(codes, 6))
    faiss_pairs = _pair_set(ph._faiss_pairs(codes, 6))
    assert numpy_pairs == faiss_pairs
    assert len(numpy_pairs) > 500


def test_faiss_codes_are_big_endian():
    packed = ph.to_faiss_codes(np.array([0x0102030405060708], dtype=np.uint64))
    assert packed.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_components_from_pairs():
    pairs = [(np.array([5, 1, 7]), np.array([3, 2, 3]))]
    labels = ph.pairs_to_components(9, pairs)
    assert labels.tolist() == [0, 1, 1, 3, 4, 3, 6, 3, 8]
