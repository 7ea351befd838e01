"""Entropy codec for WaterSIC code matrices (watersic_hf.storage): exactness, size, integrity."""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from watersic_hf.storage import (
    FORMAT_VERSION,
    EncodedCodes,
    decode_codes,
    encode_codes,
    encoded_nbytes,
    encoded_tensor_specs,
    per_column_entropy_bits,
    pooled_entropy_bits,
)
from watersic_hf.storage._bits import pack_bits, unpack_bits
from watersic_hf.storage._tokens import escape_join, escape_split, tokenize

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def realistic_codes(a: int, n: int, bits: float, seed: int = 0) -> torch.Tensor:
    """WaterSIC-like codes: Gaussian columns with log-normal spreads (σ_j ∝ exp(N(0, 0.7²))),
    one outlier column per 512 columns with codes up to ±10⁴ and 1% dead (all-zero) columns;
    the common scale is bisected so that the mean per-column entropy is ``bits``."""
    g = _gen(seed)
    x = torch.randn(a, n, generator=g, dtype=torch.float64)
    spread = torch.exp(0.7 * torch.randn(n, generator=g, dtype=torch.float64))
    outliers = torch.randperm(n, generator=g)[: max(1, n // 512)]
    dead = torch.randperm(n, generator=g)[: max(1, n // 100)]

    def codes(scale: float) -> torch.Tensor:
        z = torch.round(x * spread * scale)
        z[:, outliers] = torch.round(x[:, outliers] * 3000.0).clamp(-10**4, 10**4)
        z[:, dead] = 0
        return z.to(torch.int32)

    lo, hi = 0.05, 20.0
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if per_column_entropy_bits(codes(mid)) < bits else (lo, mid)
    return codes(math.sqrt(lo * hi))


def _round_trip(z: torch.Tensor, **kw) -> EncodedCodes:
    enc = encode_codes(z, **kw)
    out = decode_codes(enc)
    assert out.dtype == torch.int32 and out.is_contiguous() and out.shape == z.shape
    assert torch.equal(out, z.to(torch.int32))
    assert encoded_nbytes(enc) == enc.stream.numel() + enc.model.numel()
    return enc


def _cases() -> dict[str, torch.Tensor]:
    g = _gen(1)
    mixed = torch.round(torch.randn(300, 77, generator=g) * torch.logspace(-1, 1.5, 77)).int()
    mixed[:, 3] = 0  # dead column
    mixed[:, 10] = torch.randint(-10**4, 10**4 + 1, (300,), generator=g, dtype=torch.int32)
    mixed[:, 11] = torch.randint(0, 4, (300,), generator=g, dtype=torch.int32)  # one-sided
    mixed[5, 20] = 7217  # a lone outlier in an otherwise small column
    extremes = torch.tensor(
        [[INT32_MIN, INT32_MAX, 0, -1], [31, -31, 32, -32], [33, -33, 2**30, -(2**30) - 1],
         [2**31 - 2**29, 47, -48, 63]], dtype=torch.int32)
    return {
        "mixed": mixed,
        "extremes": extremes,
        "uniform_int32": torch.randint(INT32_MIN, INT32_MAX, (40, 33), generator=g,
                                       dtype=torch.int64).to(torch.int32),
        "all_zero": torch.zeros(64, 48, dtype=torch.int32),
        "constant": torch.full((9, 13), -5, dtype=torch.int32),
        "single_row": torch.round(torch.randn(1, 700, generator=g) * 4).int(),
        "single_column": torch.round(torch.randn(900, 1, generator=g) * 4).int(),
        "one_by_one": torch.tensor([[-123456]], dtype=torch.int32),
        "tall": torch.round(torch.randn(20000, 3, generator=g) * 2).int(),
    }


@pytest.mark.parametrize("coder", ["ans", "rans"])
@pytest.mark.parametrize("case", list(_cases()))
def test_round_trip(case: str, coder: str) -> None:
    enc = _round_trip(_cases()[case], coder=coder)
    assert enc.metadata["coder"] == coder


def test_default_coder_is_format_2_segments() -> None:
    small = encode_codes(torch.zeros(64, 64, dtype=torch.int32))
    assert small.metadata["coder"] == "segments" and small.metadata["format_version"] == 2
    # asking for lanes selects the format-1 rANS coder, which stays readable
    v1 = encode_codes(torch.zeros(8, 8, dtype=torch.int32), lanes=2)
    assert v1.metadata["coder"] == "rans" and v1.metadata["format_version"] == 1


@pytest.mark.parametrize("lanes", [1, 2, 7, 64, 300 * 77])
def test_round_trip_any_lane_count(lanes: int) -> None:
    # Covers a partial last step, lanes > n (one step spans several rows) and one code per lane.
    enc = _round_trip(_cases()["mixed"], lanes=lanes)
    assert enc.metadata["lanes"] == lanes


def test_empty_matrices() -> None:
    for shape in [(0, 5), (4, 0)]:
        enc = _round_trip(torch.zeros(shape, dtype=torch.int32))
        assert encoded_nbytes(enc) == 0


def test_other_integer_dtypes() -> None:
    z = torch.tensor([[1, -2], [300, 4]], dtype=torch.int64)
    assert torch.equal(decode_codes(encode_codes(z)), z.int())
    assert torch.equal(decode_codes(encode_codes(z.to(torch.int16))), z.int())


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="integer dtype"):
        encode_codes(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        encode_codes(torch.zeros(3, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        encode_codes(torch.tensor([[2**31]], dtype=torch.int64))
    with pytest.raises(ValueError, match="lanes"):
        encode_codes(torch.zeros(3, 3, dtype=torch.int32), lanes=0)
    with pytest.raises(ValueError, match="coder"):
        encode_codes(torch.zeros(3, 3, dtype=torch.int32), coder="huffman")
    with pytest.raises(ValueError, match="lanes"):
        encode_codes(torch.zeros(3, 3, dtype=torch.int32), coder="ans", lanes=2)
    with pytest.raises(ValueError, match="max_tables"):
        encode_codes(torch.zeros(3, 3, dtype=torch.int32), max_tables=65)
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode_codes(np.zeros((3, 3), dtype=np.int32))


@pytest.mark.parametrize("bits", [2.0, 3.0])
@pytest.mark.parametrize("coder", ["ans", "rans"])
def test_size_within_goal(bits: float, coder: str) -> None:
    """Stream + model ≤ per-column entropy + 0.05 bit/code on a 1024×512 realistic layer, and
    far below the pooled entropy that a single table would reach. (With 512 rows or fewer the
    plug-in per-column entropy itself is optimistic by ≈0.02–0.04 bit, see docs/format.md.)"""
    z = realistic_codes(1024, 512, bits, seed=int(bits))
    enc = _round_trip(z, coder=coder)
    rate = 8 * encoded_nbytes(enc) / z.numel()
    per_col = per_column_entropy_bits(z)
    assert abs(per_col - bits) < 0.02
    assert rate <= per_col + 0.05, (rate, per_col)
    assert rate < pooled_entropy_bits(z) - 0.2


@pytest.mark.parametrize("coder", ["ans", "rans"])
def test_deterministic(coder: str) -> None:
    z = realistic_codes(128, 96, 2.0, seed=3)
    a, b = encode_codes(z, coder=coder), encode_codes(z.clone(), coder=coder)
    assert torch.equal(a.stream, b.stream) and torch.equal(a.model, b.model)
    assert a.metadata == b.metadata


def _golden_matrix() -> torch.Tensor:
    """A fixed 24×10 matrix built from integers only (no RNG), with a dead column and two
    escapes."""
    i = torch.arange(24).view(-1, 1)
    j = torch.arange(10).view(1, -1)
    z = (((i * 7919 + j * 104729) % 23) - 11) * (j % 4 + 1) // 3
    z[:, 2] = 0
    z[5, 7] = -7217
    z[11, 3] = 40000
    return z.to(torch.int32)


# Bytes written by format version 1 for _golden_matrix() (ans; rans with 3 lanes).
_GOLDEN_MODEL = ("ff040717161722ff34191e191e191f171f212a252a2a322732" + "ff" * 31
                 + "3affffffff3aea02")
GOLDEN_V1 = {
    "ans": ("4fca50441ec788b2bae14760e51c0e846777cf0635b6aa3f08b6797e0f263dbc979805267e60bd11"
            "ad7c802ff72247810d25068abc66cdedc066b482905575037c673ccdcec7f7710ce2af7d23fd7fd8"
            "0dd438c31e2c0edd30cca7567aa403d2f6ec18686bae008ed17c0cac3863582a045ec862202305e6"
            "d3f000003104e200", 0, 124),
    "rans": ("6f2002002a572a005d663700aa83749009e721789514509f02ac7626e158197cfd88a602918d5029"
             "4f076b0c857585c8ab888ec23a3e058120542fdaaf85c6a4c4b029651a18dfce9e0f6651322eaaf9"
             "a832ed37e202ef338c33f857eb75b547a0913ae9602b5c5ab181f0c07e4dcc7e9ee515a10f621bc6"
             "e065f3e25bd5ff363c933104e200", 3, 130),
}


@pytest.mark.parametrize("coder", ["ans", "rans"])
def test_format_v1_bytes_still_decode(coder: str) -> None:
    """Checkpoints on disk must keep decoding: bytes written by format version 1 decode to the
    same matrix (a change of the coders, of the table arithmetic or of constriction's ANS shows
    up here). If the format changes on purpose, bump FORMAT_VERSION and keep a v1 decoder."""
    import zlib

    hex_stream, lanes, coded = GOLDEN_V1[coder]
    stream = np.frombuffer(bytes.fromhex(hex_stream), dtype=np.uint8).copy()
    model = np.frombuffer(bytes.fromhex(_GOLDEN_MODEL), dtype=np.uint8).copy()
    meta = {"codec": "watersic-entropy", "format_version": 1, "coder": coder, "shape": [24, 10],
            "precision_bits": 12, "lanes": lanes, "n_tables": 2, "coded_nbytes": coded,
            "escape_nbytes": 4, "n_escapes": 2, "stream_nbytes": stream.size,
            "model_nbytes": model.size,
            "crc32": {"stream": zlib.crc32(stream.tobytes()), "model": zlib.crc32(model.tobytes())}}
    enc = EncodedCodes(torch.from_numpy(stream), torch.from_numpy(model), meta)
    assert torch.equal(decode_codes(enc), _golden_matrix())


def test_metadata_is_json_and_describes_tensors(tmp_path) -> None:
    z = _cases()["mixed"]
    enc = encode_codes(z, name="model.layers.0.mlp.down_proj")
    meta = json.loads(json.dumps(enc.metadata))
    assert meta["format_version"] == FORMAT_VERSION and meta["shape"] == list(z.shape)
    specs = encoded_tensor_specs(meta)
    tensors = enc.tensors()
    assert set(specs) == set(tensors)
    for key, (shape, dtype) in specs.items():
        assert tensors[key].shape == shape and tensors[key].dtype == dtype
    # Round trip through a safetensors file, as a checkpoint would store it.
    path = tmp_path / "codes.safetensors"
    save_file({f"w.{k}": v for k, v in tensors.items()}, str(path))
    loaded = load_file(str(path))
    rebuilt = EncodedCodes.from_tensors({k: loaded[f"w.{k}"] for k in specs}, meta)
    assert torch.equal(decode_codes(rebuilt), z)


def _tampered(enc: EncodedCodes, what: str, data: torch.Tensor, fix_meta: bool) -> EncodedCodes:
    meta = copy.deepcopy(enc.metadata)
    tensors = enc.tensors()
    tensors[what] = data
    if fix_meta:  # make the metadata agree, so that only the decoder's own checks remain
        import zlib

        meta[f"{what}_nbytes"] = data.numel()
        meta["crc32"][what] = zlib.crc32(data.numpy().tobytes())
        if what == "stream":
            meta["coded_nbytes"] = data.numel() - meta["escape_nbytes"]
    return EncodedCodes.from_tensors(tensors, meta)


@pytest.mark.parametrize("coder", ["ans", "rans"])
@pytest.mark.parametrize("what", ["stream", "model"])
def test_corruption_is_detected(what: str, coder: str) -> None:
    name = "model.layers.3.self_attn.q_proj"
    enc = encode_codes(realistic_codes(128, 96, 2.0, seed=3), coder=coder)
    data = getattr(enc, what).clone()
    data[data.numel() // 2] ^= 0x5A
    with pytest.raises(ValueError, match=rf"{name}.*checksum"):
        decode_codes(_tampered(enc, what, data, fix_meta=False), name=name)
    with pytest.raises(ValueError, match=rf"{name}.*bytes but the metadata says"):
        decode_codes(_tampered(enc, what, data[:-3], fix_meta=False), name=name)


@pytest.mark.parametrize("coder", ["ans", "rans"])
def test_corruption_is_detected_without_checksum(coder: str) -> None:
    """With the checksum forged, the coders' own end-state and length checks still refuse a
    truncated or altered stream instead of returning wrong codes. (The raw escape bits have no
    structure to check; only the CRC protects them.)"""
    name = "blk.q"
    lanes = 4 if coder == "rans" else None
    enc = encode_codes(realistic_codes(128, 96, 2.0, seed=4), coder=coder, lanes=lanes)
    stream = enc.stream.clone()
    for bad in (stream[:-2], torch.cat([stream, torch.zeros(2, dtype=torch.uint8)])):
        with pytest.raises(ValueError, match=rf"{name}.*do not decode"):
            decode_codes(_tampered(enc, "stream", bad, fix_meta=True), name=name)
    for pos in (3, 40, 4 * 4 + 11, enc.metadata["coded_nbytes"] - 1):
        flipped = stream.clone()
        flipped[pos] ^= 0x10
        with pytest.raises(ValueError, match=rf"{name}.*do not decode"):
            decode_codes(_tampered(enc, "stream", flipped, fix_meta=True), name=name)


def test_wrong_format_version() -> None:
    enc = encode_codes(torch.ones(4, 4, dtype=torch.int32))
    meta = dict(enc.metadata, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="format_version"):
        decode_codes(EncodedCodes(enc.stream, enc.model, meta), name="x")
    meta = dict(enc.metadata, codec="something-else")
    with pytest.raises(ValueError, match="codec"):
        decode_codes(EncodedCodes(enc.stream, enc.model, meta), name="x")


def test_entropy_helpers() -> None:
    # Column 0 constant, column 1 balanced ±1: per-column 0.5 bit, pooled H(1/2, 1/4, 1/4).
    z = torch.tensor([[0, 1], [0, -1], [0, 1], [0, -1]], dtype=torch.int32)
    assert per_column_entropy_bits(z) == pytest.approx(0.5)
    assert pooled_entropy_bits(z) == pytest.approx(1.5)


def test_tokens_and_bit_packing() -> None:
    values = np.array([32, -32, 33, 47, 48, 63, 64, -65, 7217, -10**4, 2**30, INT32_MAX,
                       INT32_MIN], dtype=np.int64)
    tok, raw, width = escape_split(values)
    assert np.all(np.abs(tok) >= 32) and np.all(np.abs(tok) <= 85)
    assert np.all(raw < (1 << width))
    assert np.array_equal(escape_join(tok, raw), values)
    toks, idx = tokenize(np.array([[0, 31, -31, 32], [5, -40, 1, 2]], dtype=np.int32))
    assert np.array_equal(idx, [3, 5]) and toks[0, 1] == 31 and toks[1, 1] < -31
    rng = np.random.default_rng(0)
    widths = rng.integers(0, 31, size=1000)
    vals = rng.integers(0, 1 << 62, size=1000) & ((1 << widths) - 1)
    packed = pack_bits(vals, widths)
    assert packed.size == (widths.sum() + 7) // 8
    assert np.array_equal(unpack_bits(packed, widths), vals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_tables_equal_table_from_counts(seed):
    # fit_model fits every table at once over the used tokens only; each table must be exactly
    # what table_from_counts gives for its columns' pooled counts
    from watersic_hf.storage._model import MAX_TOKEN, fit_model, table_from_counts
    from watersic_hf.storage._tokens import ALPHABET

    g = np.random.default_rng(seed)
    n = 300
    spread = np.exp(g.normal(size=n)) * (1 + 3 * seed)
    z = np.rint(g.normal(size=(500, n)) * spread)
    if seed == 2:
        z[:, :10] += 40  # columns far from zero: asymmetric tables
    z = z.clip(-MAX_TOKEN, MAX_TOKEN).astype(np.int64)
    hist = np.zeros((n, ALPHABET), dtype=np.int64)
    for c in range(n):
        hist[c] = np.bincount(z[:, c] + MAX_TOKEN, minlength=ALPHABET)
    tables, assign, _ = fit_model(hist)
    assert len(tables) > 1
    for t, table in enumerate(tables):
        cols = np.flatnonzero(assign == t)
        counts = hist[cols].sum(axis=0)
        used = np.flatnonzero(counts)
        lo = int(min(np.flatnonzero(hist[c])[0] for c in cols)) - MAX_TOKEN
        hi = int(max(np.flatnonzero(hist[c])[-1] for c in cols)) - MAX_TOKEN
        assert used.size
        ref = table_from_counts(counts, lo, hi)
        assert (table.lo, table.symmetric) == (ref.lo, ref.symmetric), t
        assert np.array_equal(table.qlog, ref.qlog), t
