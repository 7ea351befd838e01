"""Segmented interleaved rANS (coder ``"segments"``, codec format version 2).

The code matrix ``(N, K)`` is cut into *segments* of whole rows (``segment_rows(K)`` rows each,
a multiple of 32). Each segment is an independent interleaved-rANS stream with a lane count
fixed by its size (``segment_lanes``), so segments decode in parallel (CPU threads, or one GPU
program each) and the work per code is bounded by the format, whatever the bytes say.

Stream bytes of one matrix::

    header   (S + 1) little-endian uint32 byte offsets of the segments inside "coded" (0 first)
             (S + 1) little-endian uint32 bit offsets of the segments' escapes inside "escapes"
    coded    per segment: L uint32 initial decoder states, then uint16 words in decode order
    escapes  the raw low bits of every escape code (|z| > 31), LSB first, in row-major order

Tokens, tables and escapes are those of format version 1 (``_tokens``, ``_model``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .._numba import lazy_module
from ._model import PRECISION, TOTAL, Table
from ._tokens import ALPHABET

if TYPE_CHECKING:  # numba's module: not imported at run time until used
    from .._packing_jit import PackTarget

_jit = lazy_module("watersic_hf.storage._jit")  # numba loads on first use (see _numba.py)

SEGMENT_SYMBOLS = 1 << 18  # target codes per segment
SYMBOLS_PER_LANE = 4096
MAX_SEGMENT_LANES = 64  # = storage._jit.MAX_LANES (checked by tests/test_format_v2.py)


def segment_rows(k: int) -> int:
    """Rows per segment for ``k`` columns: a multiple of 32, about 2^18 codes."""
    return 32 * max(1, SEGMENT_SYMBOLS // (32 * max(int(k), 1)))


def segment_lanes(n_rows: int, k: int) -> np.ndarray:
    """Lanes of every segment (one per ~4096 codes, 1..64), int64 of shape ``(S,)``."""
    rows = segment_rows(k)
    n_seg = -(-n_rows // rows)
    sizes = np.minimum(rows, n_rows - rows * np.arange(n_seg, dtype=np.int64)) * k
    return np.clip(sizes // SYMBOLS_PER_LANE, 1, MAX_SEGMENT_LANES).astype(np.int64)


def header_nbytes(n_rows: int, k: int) -> int:
    """Bytes of the segment header."""
    return 8 * (segment_lanes(n_rows, k).size + 1)


def tokens_and_histograms(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (int16, ``(N, K)``) and per-column token histograms (int64, ``(K, ALPHABET)``)."""
    n_rows, k = codes.shape
    tokens = np.empty((n_rows, k), dtype=np.int16)
    hist = np.zeros((1, k, ALPHABET), dtype=np.int64)
    _jit.tokenize_histogram(np.ascontiguousarray(codes, dtype=np.int32), tokens, hist)
    return tokens, hist.sum(axis=0)


def _frequency_arrays(
    tables: list[Table], column_table: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    per_table = [t.frequencies() for t in tables]
    freq = np.concatenate(per_table).astype(np.int64)
    start = np.concatenate([np.cumsum(f) - f for f in per_table]).astype(np.int64)
    sizes = np.array([t.size for t in tables], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    lows = np.array([t.lo for t in tables], dtype=np.int64)
    col_base = (offsets - lows)[column_table]
    return freq, start, col_base


def decoder_table(tables: list[Table]) -> np.ndarray:
    """Slot lookup table of the decoders, flat ``(n_tables * TOTAL,)`` uint32; integer arithmetic
    only. Entry = ``(freq - 1) << 20 | (slot - start) << 8 | (token + 128)`` (12 + 12 + 8 bits),
    so one load gives a step everything it needs."""
    n_tab = len(tables)
    table = np.empty((n_tab, TOTAL), dtype=np.uint32)
    slots = np.arange(TOTAL, dtype=np.int64)
    for g, t in enumerate(tables):
        f = t.frequencies()
        owner = np.repeat(np.arange(t.size), f)
        bias = slots - (np.cumsum(f) - f)[owner]
        table[g] = ((f[owner] - 1) << 20 | bias << 8 | (owner + t.lo + 128)).astype(np.uint32)
    return table.reshape(-1)


def encode(
    tokens: np.ndarray, column_table: np.ndarray, tables: list[Table]
) -> tuple[np.ndarray, np.ndarray]:
    """Encode a token matrix.

    Args:
        tokens (`np.ndarray` of shape `(N, K)`, int16).
        column_table (`np.ndarray` of shape `(K,)`, int64): table of each column.
        tables (`list[Table]`).

    Returns:
        ``(coded, seg_off)``: the concatenated segments (uint8) and their byte offsets
        (int64, ``(S + 1,)``).
    """
    n_rows, k = tokens.shape
    lanes = segment_lanes(n_rows, k)
    rows = segment_rows(k)
    sizes = np.minimum(rows, n_rows - rows * np.arange(lanes.size, dtype=np.int64)) * k
    capacity = 4 * lanes + 2 * sizes  # at most one 16-bit word per code
    region = np.concatenate([[0], np.cumsum(capacity)]).astype(np.int64)
    scratch = np.empty(int(region[-1]), dtype=np.uint8)
    used = np.zeros(lanes.size, dtype=np.int64)
    freq, start, col_base = _frequency_arrays(tables, column_table)
    _jit.rans_encode_segments(
        np.ascontiguousarray(tokens, dtype=np.int16), col_base, freq, start, rows, lanes, region,
        scratch, used)
    seg_off = np.concatenate([[0], np.cumsum(used)]).astype(np.int64)
    pieces = [scratch[region[s + 1] - used[s]: region[s + 1]] for s in range(lanes.size)]
    return np.concatenate(pieces), seg_off


def escape_offsets(escape_rows: np.ndarray, escape_widths: np.ndarray, n_rows: int,
                   k: int) -> np.ndarray:
    """Bit offset of each segment's escapes (int64, ``(S + 1,)``).

    Args:
        escape_rows (`np.ndarray`, int64): row of every escape, in row-major order.
        escape_widths (`np.ndarray`, int64): raw width of every escape.
    """
    rows = segment_rows(k)
    n_seg = segment_lanes(n_rows, k).size
    seg = escape_rows // rows
    bits = np.bincount(seg, weights=escape_widths.astype(np.float64), minlength=n_seg)
    return np.concatenate([[0], np.cumsum(bits.astype(np.int64))]).astype(np.int64)


def _decoder_inputs(
    coded: np.ndarray, seg_off: np.ndarray, escapes: np.ndarray, esc_off: np.ndarray,
    shape: tuple[int, int], column_table: np.ndarray, tables: list[Table],
) -> tuple[_jit.Stream, _jit.Tables]:
    n_rows, k = shape
    slack = np.zeros(escapes.size + 8, dtype=np.uint8)
    slack[: escapes.size] = escapes
    stream = _jit.Stream(coded, seg_off, slack, esc_off)
    lookup = _jit.Tables(decoder_table(tables), column_table.astype(np.int64), segment_rows(k),
                         segment_lanes(n_rows, k))
    return stream, lookup


def _raise_first(errors: np.ndarray) -> None:
    bad = np.flatnonzero(errors)
    if bad.size:
        s = int(bad[0])
        raise ValueError(f"segment {s} of {errors.size}: {_jit.ERRORS[int(errors[s])]}")


def decode(
    coded: np.ndarray, seg_off: np.ndarray, escapes: np.ndarray, esc_off: np.ndarray,
    shape: tuple[int, int], column_table: np.ndarray, tables: list[Table],
) -> np.ndarray:
    """Decode the segments into the code matrix.

    Returns:
        `np.ndarray` of shape `(N, K)`, int32.

    Raises:
        ValueError: a segment is truncated, too long, fails its end-state check, or its escape
            bits do not match (the message names the first bad segment).
    """
    stream, lookup = _decoder_inputs(coded, seg_off, escapes, esc_off, shape, column_table,
                                     tables)
    out = np.empty(shape, dtype=np.int32)
    errors = np.zeros(lookup.seg_lanes.size, dtype=np.int64)
    _jit.rans_decode_segments(stream, lookup, out, errors)
    _raise_first(errors)
    return out


def decode_pack(
    coded: np.ndarray, seg_off: np.ndarray, escapes: np.ndarray, esc_off: np.ndarray,
    shape: tuple[int, int], column_table: np.ndarray, tables: list[Table],
    meta: np.ndarray, target: PackTarget,
) -> None:
    """Decode the segments straight into packed words (the stream is in packed column order).

    Args:
        meta (`np.ndarray` of shape `(NG, 8)`, int64): the validated stored group table.
        target (`PackTarget`): zeroed outputs (``packing.pack_target``), filled in place.

    Raises:
        ValueError: as :func:`decode`, or a code does not fit the group table.
    """
    stream, lookup = _decoder_inputs(coded, seg_off, escapes, esc_off, shape, column_table,
                                     tables)
    errors = np.zeros(lookup.seg_lanes.size, dtype=np.int64)
    _jit.rans_decode_pack_segments(stream, lookup, shape[0], meta, target, errors)
    _raise_first(errors)


__all__ = [
    "PRECISION",
    "decode",
    "decode_on_device",
    "decode_pack",
    "decoder_table",
    "encode",
    "escape_offsets",
    "header_nbytes",
    "segment_lanes",
    "segment_rows",
    "tokens_and_histograms",
]


def decode_on_device(
    coded: torch.Tensor, seg_off: np.ndarray, escapes: torch.Tensor, esc_off: np.ndarray,
    shape: tuple[int, int], column_table: np.ndarray, tables: list[Table],
) -> torch.Tensor:
    """:func:`decode` with the Triton kernel, on the device of ``coded`` (uint8 tensors).

    Returns:
        `torch.Tensor` of shape `(N, K)`, int32, on that device.

    Raises:
        ValueError: as :func:`decode`.
    """
    from ..kernels import triton_decode_segments

    n_rows, k = shape
    device = coded.device
    lanes = segment_lanes(n_rows, k)
    table = decoder_table(tables)
    slack = torch.zeros(escapes.numel() + 8, dtype=torch.uint8, device=device)
    slack[: escapes.numel()] = escapes

    def dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    out, errors = triton_decode_segments(
        coded.contiguous(), dev(seg_off, torch.int64), slack, dev(esc_off, torch.int64),
        dev(table.view(np.int32), torch.int32),
        dev(column_table, torch.int32), dev(lanes, torch.int32), segment_rows(k), shape)
    _raise_first(errors.cpu().numpy())
    return out
