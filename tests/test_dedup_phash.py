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


def test_sampled_bits_by_hand():
    # round(log2 N) + 2: log2 of 1e6 is 19.93, of 1e7 23.25, of 2.9e6 21.47, of 3e6 21.52.
    assert ph.sampled_bits_for(1_000_000, 6) == 22
    assert ph.sampled_bits_for(10_000_000, 6) == 25
    assert ph.sampled_bits_for(2_900_000, 6) == 23
    assert ph.sampled_bits_for(3_000_000, 6) == 24
    assert ph.sampled_bits_for(1 << 20, 6) == 22
    assert ph.sampled_bits_for(1, 6) == 3
    # 2**40 codes would take 42 bits; band values stop at 32 bits.
    assert ph.sampled_bits_for(1 << 40, 6) == 32


def test_sampled_tables_for_count_by_hand():
    # 22 bits at radius 6: p = (42*41*40*39*38*37) / (64*63*62*61*60*59) = 0.069968, and
    # ceil(ln 0.01 / ln(1 - p)) = ceil(63.49) = 64 tables.
    scheme = ph.make_scheme(6, "sampled", count=1_000_000)
    assert len(scheme.bands) == 64
    assert {len(band) for band in scheme.bands} == {22}
    # 25 bits (10M codes): p = (39*38*37*36*35*34) / (64*...*59) = 0.043517, ceil(103.5) = 104.
    assert len(ph.make_scheme(6, "sampled", count=10_000_000).bands) == 104
    # 12 bits (1,000 codes): p = (52*51*50*49*48*47) / (64*...*59) = 0.271543, ceil(14.53) = 15.
    assert len(ph.make_scheme(6, "sampled", count=1000).bands) == 15
    # Explicit bits win over the count.
    assert {len(band) for band in ph.make_scheme(6, "sampled", count=1000, bits=20).bands} == {20}


def test_estimated_work_by_hand():
    # Radius 6: one 10-bit band and six 9-bit bands. 1,024 codes, pair cost 1:
    # 9 bits: 1024 + 1024 * 1023 / 2**10 = 2047; 10 bits: 1024 + 1024 * 1023 / 2**11 = 1535.5.
    assert ph.estimated_work(ph.pigeonhole_scheme(6), 1024, pair_cost=1.0) == pytest.approx(6 * 2047 + 1535.5)
    assert ph.estimated_work(ph.pigeonhole_scheme(6), 1024, pair_cost=0.0) == 7 * 1024


def test_auto_scheme_by_hand():
    # 1M codes, radius 6. Pigeonhole: 7e6 band values + 6.347e9 pairs; sampled: 64 tables of
    # 22 bits, 6.4e7 band values + 64 * 1e6**2 / 2**23 = 7.6e6 pairs.
    # With pair cost 0.03: 7e6 + 1.9e8 = 1.97e8 > 2 * 6.42e7, so sampled.
    assert not ph.make_scheme(6, "auto", count=1_000_000).exact
    # 500,000 codes: pigeonhole 3.5e6 + 0.03 * 1.587e9 = 5.11e7; sampled 55 tables of 21 bits
    # (round(18.93) + 2), 2.75e7 + 0.03 * 55 * 2.5e11 / 2**22 = 2.76e7: 5.11e7 <= 5.52e7, so pigeonhole.
    assert ph.make_scheme(6, "auto", count=500_000).exact
    # A pair cost near zero keeps pigeonhole at 1M.
    assert ph.make_scheme(6, "auto", count=1_000_000, pair_cost=1e-4).exact


def test_auto_and_sampled_need_count():
    with pytest.raises(ValueError, match="needs the number of codes"):
        ph.make_scheme(6, "auto")
    with pytest.raises(ValueError, match="needs the number of codes"):
        ph.make_scheme(6, "sampled")
    assert ph.make_scheme(6, "pigeonhole").exact


def test_single_band_of_64_bits_finds_equal_codes():
    # Radius 0 is one 64-bit band, grouped by argsort instead of the (value << 32 | index) sort.
    codes = np.array([7, 1 << 63, 7, 3, 1 << 63, 7], dtype=np.uint64)
    found = _pair_set(ph.candidate_pairs(codes, ph.pigeonhole_scheme(0)))
    assert found == {(0, 2), (0, 5), (2, 5), (1, 4)}


def test_radius_zero_sampled_and_auto():
    # At radius 0 any sampled table finds every equal pair, so one table is enough.
    sampled = ph.make_scheme(0, "sampled", count=10)
    assert len(sampled.bands) == 1
    assert len(sampled.bands[0]) == ph.sampled_bits_for(10, 0)
    assert len(ph.make_scheme(0, "sampled", bits=8).bands) == 1
    assert len(ph.make_scheme(0, "auto", count=1).bands) == 1
    assert len(ph.make_scheme(0, "auto", count=10**9).bands) == 1


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


def _edges(codes, values, radius):
    low, root = ph.group_code_edges(np.array(codes, dtype=np.uint64), np.array(values, dtype=np.uint32), radius)
    return sorted(zip(low.tolist(), root.tolist()))


def test_group_code_edges_by_radius():
    codes = [5, 5, 7, 1 << 40, (1 << 40) | 3, 9]
    # 5 (0b0101) and 7 (0b0111) differ in one bit, 9 (0b1001) and 5 in two, 9 and 7 in three.
    # 1 << 40 and (1 << 40) | 3 differ in two bits. The repeated 5 counts once.
    values = [1, 1, 1, 2, 2, 1]
    assert _edges(codes, values, radius=1) == [(7, 5)]
    assert _edges(codes, values, radius=2) == [(7, 5), (9, 5), ((1 << 40) | 3, 1 << 40)]
    # Codes within the radius but with different band values are not compared.
    assert _edges([5, 7], [1, 2], radius=1) == []


def test_group_code_edges_below_group_size():
    # 3,000 members, all within radius 4 of each other and sharing one band value: a full graph
    # verified with faiss (the group exceeds FAISS_MIN_GROUP), sent as a star of n - 1 edges.
    base = 0xFFFF_0000_FFFF_0000
    codes = sorted({base ^ (1 << (i % 64)) ^ (1 << ((i // 64) % 64)) for i in range(3000)})
    assert len(codes) > ph.FAISS_MIN_GROUP
    edges = _edges(codes, [0] * len(codes), radius=4)
    assert len(edges) == len(codes) - 1
    assert {root for _, root in edges} == {codes[0]}
    assert {low for low, _ in edges} == set(codes[1:])


def test_candidate_pairs_with_no_shared_band_value():
    # Two codes whose pigeonhole bands all differ: no group, no pair (this used to divide by zero).
    codes = np.array([0, 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)
    assert list(ph.candidate_pairs(codes, ph.pigeonhole_scheme(6))) == []


def test_sorted_unique_matches_numpy_unique():
    values = np.array([7, 3, 7, 2**64 - 1, 0, 3, 0], dtype=np.uint64)
    assert ph.sorted_unique(values).tolist() == [0, 3, 7, 2**64 - 1]
    assert ph.sorted_unique(np.empty(0, dtype=np.uint64)).tolist() == []


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
