"""Packed in-memory format: exact round trips, bit layout, determinism and size."""

from __future__ import annotations

import pytest
import torch

from watersic_hf import packing


def spread_codes(n: int, k: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Gaussian codes whose spread varies per column (log-normal), like WaterSIC's."""
    gen = torch.Generator().manual_seed(seed)
    col = scale * torch.exp(0.6 * torch.randn(k, generator=gen))
    return (torch.randn(n, k, generator=gen) * col).round().to(torch.int32)


def pooled_entropy(codes: torch.Tensor) -> float:
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / codes.numel()
    return float(-(p * p.log2()).sum())


def roundtrip(codes: torch.Tensor) -> packing.PackedCodes:
    packed = packing.pack_codes(codes)
    decoded = packing.unpack_codes(packed.tensors, codes.shape[1], codes.shape[0])
    assert decoded.dtype == torch.int32
    assert torch.equal(decoded, codes)
    return packed


@pytest.mark.parametrize("width", range(0, packing.MAX_WIDTH + 1))
def test_every_width_roundtrips(width):
    gen = torch.Generator().manual_seed(width)
    lo = -(1 << width) // 2
    codes = torch.randint(lo, lo + (1 << width), (40, 64), generator=gen, dtype=torch.int32)
    codes[0, :] = lo  # both ends of the range present in every column
    codes[1, :] = lo + (1 << width) - 1
    packed = roundtrip(codes)
    meta = packed.tensors["weight_group_meta"]
    # uniform codes over exactly 2^width values: the optimum is that width with no escapes
    assert meta[:, packing.META_WIDTH].tolist() == [width, width]
    assert (meta[:, packing.META_ESC_SLOT] == -1).all()
    assert packed.layout["words"] == 2 * width


@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (33, 1), (7, 65), (65, 31), (3, 200)])
def test_odd_shapes_roundtrip(shape):
    roundtrip(spread_codes(*shape, scale=4.0, seed=sum(shape)))


def test_escapes_negative_huge_and_zero_columns():
    codes = spread_codes(96, 150, scale=2.0, seed=1)
    codes[:, 3] = 0  # all-zero (dead) columns
    codes[:, 77] = 0
    gen = torch.Generator().manual_seed(2)
    codes[:, 40] = (torch.randn(96, generator=gen) * 7000).round().int()  # outlier column
    codes[5, 10] = 10_000
    codes[6, 11] = -10_000
    codes[7, 12] = packing.MAX_ABS_CODE
    codes[8, 13] = -packing.MAX_ABS_CODE
    packed = roundtrip(codes)
    meta = packed.tensors["weight_group_meta"]
    assert packed.layout["escape_groups"] > 0 and packed.layout["escape_words"] > 0
    assert (meta[:, packing.META_ESC_SLOT] >= 0).any()
    assert meta[:, packing.META_MAXABS].max() == packing.MAX_ABS_CODE
    # the two zero columns sit in the first permuted positions (lowest entropy)
    assert set(packed.tensors["weight_perm"][:2].tolist()) == {3, 77}


def test_all_zero_matrix_has_no_words():
    codes = torch.zeros(5, 70, dtype=torch.int32)
    packed = roundtrip(codes)
    assert packed.layout["words"] == 0 and packed.layout["escape_words"] == 0
    assert packed.tensors["weight_packed"].shape == (0, 5)


def test_sparse_column_uses_one_bit_marker():
    # mostly zeros with rare large values: 1-bit main stream (0 or marker) plus escapes
    codes = torch.zeros(256, 32, dtype=torch.int32)
    codes[::50, :] = 9
    packed = roundtrip(codes)
    meta = packed.tensors["weight_group_meta"][0]
    assert meta[packing.META_WIDTH] == 1 and meta[packing.META_ESC_SLOT] == 0
    # the single escape value needs no bits at all
    assert meta[packing.META_ESC_WIDTH] == 0


def test_bit_layout_is_little_endian_within_the_group():
    # one row, codes 0..31 in one group: no permutation (all columns have entropy 0),
    # width 5, lo 0; the words are the little-endian 160-bit integer sum(k << 5k)
    codes = torch.arange(32, dtype=torch.int32).view(1, 32)
    packed = packing.pack_codes(codes)
    assert packed.tensors["weight_perm"].tolist() == list(range(32))
    assert packed.tensors["weight_group_meta"][0, :3].tolist() == [5, 0, 0]
    big = sum(k << (5 * k) for k in range(32))
    expected = [(big >> (32 * j)) & 0xFFFFFFFF for j in range(5)]
    got = [w & 0xFFFFFFFF for w in packed.tensors["weight_packed"][:, 0].tolist()]
    assert got == expected


def test_escape_base_counts_markers_of_earlier_row_chunks():
    codes = spread_codes(100, 64, scale=3.0, seed=3)
    packed = packing.pack_codes(codes)
    t = packed.tensors
    meta, perm = t["weight_group_meta"].long(), t["weight_perm"].long()
    permuted = codes[:, perm].long()
    for g in range(meta.shape[0]):
        slot = int(meta[g, packing.META_ESC_SLOT])
        if slot < 0:
            continue
        b, lo = int(meta[g, packing.META_WIDTH]), int(meta[g, packing.META_LO])
        block = permuted[:, g * 32 : (g + 1) * 32]
        escaped = (block < lo) | (block > lo + (1 << b) - 2)
        per_row = escaped.sum(1)
        for c in range(t["weight_escape_base"].shape[1]):
            assert int(t["weight_escape_base"][slot, c]) == int(per_row[: 32 * c].sum())


def test_packing_is_deterministic():
    codes = spread_codes(64, 96, scale=3.0, seed=4)
    a, b = packing.pack_codes(codes), packing.pack_codes(codes.clone())
    assert a.layout == b.layout
    for name in packing.CODE_TENSOR_NAMES:
        assert a.tensors[name].dtype == torch.int32
        assert a.tensors[name].numpy().tobytes() == b.tensors[name].numpy().tobytes()


def test_param_specs_match_packed_tensors():
    codes = spread_codes(45, 77, scale=2.5, seed=5)
    packed = packing.pack_codes(codes)
    specs = packing.param_specs(77, 45, packed.layout)
    for name in packing.CODE_TENSOR_NAMES:
        shape, dtype = specs[name]
        assert tuple(packed.tensors[name].shape) == shape and packed.tensors[name].dtype == dtype
    assert specs["weight_col_scale"] == ((77,), torch.float16)


@pytest.mark.parametrize("scale", [0.7, 1.6, 3.5])
def test_size_within_half_a_bit_of_pooled_entropy(scale):
    n, k = 512, 512
    codes = spread_codes(n, k, scale=scale, seed=6)
    packed = packing.pack_codes(codes)
    nbytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    bits = 8 * nbytes / (n * k) + 16 / n + 16 / k  # + fp16 row and column scales
    entropy = pooled_entropy(codes)
    assert 1.0 < entropy < 5.0
    assert bits <= entropy + 0.5, f"{bits:.3f} bits vs pooled entropy {entropy:.3f}"
    # never below the entropy of the per-column code distributions (sanity of the accounting)
    per_col = sum(pooled_entropy(codes[:, j]) for j in range(k)) / k
    assert bits > per_col


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="magnitude"):
        packing.pack_codes(torch.tensor([[packing.MAX_ABS_CODE + 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="matrix"):
        packing.pack_codes(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_size"):
        packing.pack_codes(torch.zeros(3, 3, dtype=torch.int32), group_size=64)
    layout = packing.pack_codes(torch.zeros(3, 3, dtype=torch.int32)).layout
    with pytest.raises(ValueError, match="version"):
        packing.param_specs(3, 3, {**layout, "version": 99})
    with pytest.raises(ValueError, match="words"):
        packing.param_specs(3, 3, {**layout, "words": -1})
    with pytest.raises(ValueError, match="format"):
        packing.param_specs(3, 3, {**layout, "format": "gguf"})

