"""Interleaved rANS with per-symbol tables, vectorised over lanes with NumPy.

Symbols are taken in row-major order; symbol ``k`` belongs to lane ``k mod L`` and is decoded in
step ``k // L``, so one step decodes ``L`` consecutive codes of the matrix with a handful of
array operations (no Python work per symbol), and each symbol may use a different table (its
column's). All lanes share one word stream: within a step, the lanes that need a new word take
them in lane order. This is the usual interleaved-rANS layout of GPU decoders, so the same bytes
can later be decoded by a parallel kernel.

Coder parameters (Giesen's 32-bit rANS with 16-bit words): state ``x`` in ``[2**16, 2**32)``,
probabilities with ``PRECISION`` = 12 bits, so one renormalisation read per symbol suffices.
The encoder starts every lane at ``2**16``; a correct decode therefore ends with every lane back
at ``2**16`` and every word consumed, which the decoder checks.

Stream layout: ``L`` little-endian uint32 initial decoder states, then little-endian uint16
words in the order the decoder reads them.
"""

from __future__ import annotations

import numpy as np

from ._model import PRECISION, TOTAL, Table

STATE_LOW = 1 << 16
_WORD_BITS = 16


def lut_offsets(tables: list[Table]) -> np.ndarray:
    """Start of each table in the concatenated per-token arrays (int64, one per table)."""
    sizes = np.array([t.size for t in tables], dtype=np.int64)
    return np.cumsum(sizes) - sizes


def _tiled(per_column: np.ndarray, length: int) -> np.ndarray:
    """``per_column`` repeated to at least ``length`` entries (for sliding column views)."""
    reps = -(-length // per_column.size)
    return np.tile(per_column, reps)


def encode(
    tokens: np.ndarray, column_table: np.ndarray, tables: list[Table], lanes: int
) -> np.ndarray:
    """rANS-encode a token matrix.

    Args:
        tokens (`np.ndarray` of shape `(a, n)`, int16): tokens, row-major.
        column_table (`np.ndarray` of shape `(n,)`, int64): table index of each column.
        tables (`list[Table]`): the tables; each column's tokens lie in its table's range.
        lanes (`int`): number of interleaved lanes ``L`` (>= 1).

    Returns:
        `np.ndarray`, uint8: the stream (see module docstring).
    """
    a, n = tokens.shape
    total = a * n
    flat = tokens.reshape(-1)
    per_table = [t.frequencies() for t in tables]
    freq = np.concatenate(per_table).astype(np.uint64)
    start = np.concatenate([np.cumsum(f) - f for f in per_table]).astype(np.uint64)
    offsets = lut_offsets(tables)
    limit = freq << np.uint64(32 - PRECISION)  # emit a word when x >= f * 2**(32 - P)
    # Index of token t of column j in the concatenated arrays: col_base[j] + t.
    col_base = offsets[column_table] - np.array([t.lo for t in tables])[column_table]
    base_ext = _tiled(col_base, n + lanes)
    steps = -(-total // lanes)
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    chunks: list[np.ndarray] = []
    p = np.uint64(PRECISION)
    w = np.uint64(_WORD_BITS)
    for s in range(steps - 1, -1, -1):
        lo = s * lanes
        r = min(lanes, total - lo)
        o = lo % n
        idx = flat[lo: lo + r] + base_ext[o: o + r]
        f = freq[idx]
        xs = x[:r]
        emit = np.flatnonzero(xs >= limit[idx])
        chunks.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs[emit] >>= w
        q = xs // f
        x[:r] = (q << p) + (xs - q * f) + start[idx]
    head = x.astype("<u4").view(np.uint8)
    body = [c.view(np.uint8) for c in reversed(chunks)]
    return np.concatenate([head, *body])


def decode(
    stream: np.ndarray, shape: tuple[int, int], column_table: np.ndarray, tables: list[Table],
    lanes: int,
) -> np.ndarray:
    """Decode a stream written by :func:`encode`.

    Args:
        stream (`np.ndarray`, uint8): the rANS bytes (exactly, no trailing data).
        shape (`tuple[int, int]`): ``(a, n)``.
        column_table (`np.ndarray` of shape `(n,)`, int64): table index of each column.
        tables (`list[Table]`): the tables.
        lanes (`int`): number of lanes ``L``.

    Returns:
        `np.ndarray` of shape `(a * n,)`, int32: the tokens, row-major.

    Raises:
        ValueError: the stream is too short, too long or does not end in the initial state.
    """
    a, n = shape
    total = a * n
    head = 4 * lanes
    if stream.size < head or (stream.size - head) % 2:
        raise ValueError("rANS stream has an impossible length")
    x_all = stream[:head].view("<u4").astype(np.uint32)
    x = x_all
    words = stream[head:].view("<u2").astype(np.uint32)
    n_words = words.size
    # Per-slot lookup tables: slot -> token, and slot -> (frequency << 16 | slot - start).
    n_tab = len(tables)
    # int8 tokens (|t| <= 85) keep the lookup table small enough to stay in cache.
    sym = np.empty((n_tab, TOTAL), dtype=np.int8)
    fb = np.empty((n_tab, TOTAL), dtype=np.uint32)
    slots = np.arange(TOTAL, dtype=np.int64)
    for g, t in enumerate(tables):
        f = t.frequencies()
        owner = np.repeat(np.arange(t.size), f)
        sym[g] = owner + t.lo
        fb[g] = ((f[owner] << 16) | (slots - (np.cumsum(f) - f)[owner])).astype(np.uint32)
    sym = sym.reshape(-1)
    fb = fb.reshape(-1)
    base_ext = _tiled((column_table << PRECISION).astype(np.uint32), n + lanes)
    out = np.empty(total, dtype=np.int32)
    steps = -(-total // lanes)
    idx = np.empty(lanes, dtype=np.uint32)
    ent = np.empty(lanes, dtype=np.uint32)
    tmp = np.empty(lanes, dtype=np.uint32)
    tok = np.empty(lanes, dtype=np.int8)
    need = np.empty(lanes, dtype=bool)
    mask = np.uint32(TOTAL - 1)
    p = np.uint32(PRECISION)
    w = np.uint32(_WORD_BITS)
    low_bits = np.uint32(0xFFFF)
    state_low = np.uint32(STATE_LOW)
    pos = 0
    for s in range(steps):
        lo = s * lanes
        r = min(lanes, total - lo)
        if r < lanes:  # last, partial step: only the first r lanes hold a symbol
            x, idx, ent, tmp, tok = x_all[:r], idx[:r], ent[:r], tmp[:r], tok[:r]
            need = need[:r]
        o = lo % n
        np.bitwise_and(x, mask, out=idx)
        np.add(idx, base_ext[o: o + r], out=idx)
        sym.take(idx, out=tok, mode="clip")  # "clip": indices are valid; avoids a buffer copy
        out[lo: lo + r] = tok
        fb.take(idx, out=ent, mode="clip")
        np.right_shift(x, p, out=x)
        np.right_shift(ent, w, out=tmp)
        np.multiply(x, tmp, out=x)
        np.bitwise_and(ent, low_bits, out=ent)
        np.add(x, ent, out=x)
        np.less(x, state_low, out=need)
        refill = np.flatnonzero(need)
        k = refill.size
        if k:
            if pos + k > n_words:
                raise ValueError("rANS stream ends before the last code (truncated?)")
            xr = x[refill]
            xr <<= w
            xr |= words[pos: pos + k]
            x[refill] = xr
            pos += k
    if pos != n_words:
        raise ValueError(f"rANS stream has {n_words - pos} unread words (corrupted?)")
    if total and not np.all(x_all == state_low):
        raise ValueError("rANS decoder did not return to its initial state (corrupted stream)")
    return out
