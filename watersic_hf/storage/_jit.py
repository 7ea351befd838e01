"""Compiled (numba) loops of the format-v2 entropy codec.

Everything here works on NumPy arrays and releases the GIL (``nogil``). The loops are serial on
purpose: callers run whole layers on a thread pool (loading and saving a model), which keeps
every core busy without a thread-pool handshake per call; on a shared machine that handshake
(waiting for the slowest worker to be scheduled) cost more than the decoding of a small layer.
Compiled code is cached on disk (``cache=True``) so a process pays the compile time once per
machine. numba is a JIT with prebuilt wheels: ``pip install`` needs no compiler.

Error handling: compiled loops never raise. Each work item writes a status code (0 = fine) to
an ``errors`` array that the Python caller turns into a ``ValueError`` naming the tensor, so a
corrupt or crafted stream is reported, never silently decoded into wrong weights.

rANS parameters (as in format v1, ``_rans``): 32-bit state in ``[2^16, 2^32)``, 16-bit words,
``PRECISION`` = 12-bit frequencies, every lane starts (encoder) and ends (decoder) at ``2^16``.
Within a segment of ``T`` symbols and ``L`` lanes, symbol ``i`` belongs to lane ``i mod L`` and
is decoded in step ``i // L``; the lanes share the segment's word stream, taken in lane order
within each step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .._packing_jit import E_RANGE, PackTarget, pack_rows
from .._packing_jit import ERRORS as _PACK_ERRORS

PRECISION = 12
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 16
DIRECT_MAX = 31
FIRST_OCTAVE = 5
MAX_LANES = 64  # lanes per segment (``_segments.MAX_SEGMENT_LANES``)
PACK_BATCH_CODES = 1 << 22  # codes decoded before packing (16 MB of int32, cache-sized)

# status codes written by the compiled loops (see ``ERRORS``)
OK, E_SHORT, E_LONG, E_STATE, E_ESCAPE, E_HEADER = 0, 1, 2, 3, 4, 6
ERRORS = {
    E_SHORT: "the stream ends before the last code (truncated?)",
    E_LONG: "the stream has unread words (corrupted?)",
    E_STATE: "the rANS decoder did not return to its initial state (corrupted stream)",
    E_ESCAPE: "the escape bits do not match the escape codes (corrupted stream)",
    E_HEADER: "the segment table points outside the stream (corrupted header)",
    E_RANGE: _PACK_ERRORS[E_RANGE],
}


# ---------------------------------------------------------------------------- rANS encoder
@njit(cache=True, nogil=True)
def rans_encode_segments(
    tokens: np.ndarray,  # (N, K) int16, permuted column order
    col_base: np.ndarray,  # (K,) int64: index of token 0 of column k in freq/start
    freq: np.ndarray,  # (F,) int64
    start: np.ndarray,  # (F,) int64
    seg_rows: int,
    seg_lanes: np.ndarray,  # (S,) int64
    seg_out: np.ndarray,  # (S + 1,) int64: start of each segment's scratch region in ``out``
    out: np.ndarray,  # (total scratch,) uint8
    used: np.ndarray,  # (S,) int64: bytes written at the END of each region (output)
) -> None:
    """Encode every segment into the tail of its scratch region (states first, then words)."""
    n_rows, k = tokens.shape
    n_seg = seg_lanes.shape[0]
    for s in range(n_seg):
        r0 = s * seg_rows
        rows = min(seg_rows, n_rows - r0)
        t_sym = rows * k
        lanes = seg_lanes[s]
        x = np.full(lanes, STATE_LOW, dtype=np.uint64)
        end = seg_out[s + 1]
        wp = end  # words are written backwards from the end of the region
        steps = (t_sym + lanes - 1) // lanes
        i = t_sym - 1
        row = rows - 1
        col = k - 1
        for step in range(steps - 1, -1, -1):
            r = min(lanes, t_sym - step * lanes)
            for lane in range(r - 1, -1, -1):
                idx = col_base[col] + tokens[r0 + row, col]
                f = np.uint64(freq[idx])
                xl = x[lane]
                if xl >= (f << np.uint64(32 - PRECISION)):
                    wp -= 2
                    out[wp] = np.uint8(xl & np.uint64(0xFF))
                    out[wp + 1] = np.uint8((xl >> np.uint64(8)) & np.uint64(0xFF))
                    xl >>= np.uint64(16)
                q = xl // f
                xl = (q << np.uint64(PRECISION)) + (xl - q * f) + np.uint64(start[idx])
                x[lane] = xl
                i -= 1
                col -= 1
                if col < 0:
                    col = k - 1
                    row -= 1
        for lane in range(lanes - 1, -1, -1):
            wp -= 4
            v = x[lane]
            for b in range(4):
                out[wp + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))
        used[s] = end - wp


# ---------------------------------------------------------------------------- rANS decoder
class Stream(NamedTuple):
    """The byte parts of one format-2 stream (numba takes it as one argument)."""

    coded: np.ndarray  # (C,) uint8: the concatenated segments
    seg_off: np.ndarray  # (S + 1,) int64: byte offsets of the segments in ``coded``
    esc_bits: np.ndarray  # (E,) uint8: raw escape bits, LSB first, plus 8 zero bytes of slack
    esc_off: np.ndarray  # (S + 1,) int64: bit offset of each segment's escapes


class Tables(NamedTuple):
    """What the decoder looks up (numba takes it as one argument)."""

    table: np.ndarray  # (n_tables * TOTAL,) uint32: see ``_segments.decoder_table``
    col_table: np.ndarray  # (K,) int64: table of each (permuted) column
    seg_rows: int
    seg_lanes: np.ndarray  # (S,) int64


@njit(cache=True, nogil=True)
def _words(coded: np.ndarray) -> np.ndarray:
    """16-bit words at every even offset (segments start at even offsets), as uint32.

    A step may read up to one word per lane past its segment before the end-of-step check; the
    slack keeps those reads inside the array (the format caps lanes at MAX_LANES).
    """
    n_words = coded.shape[0] // 2
    words = np.zeros(n_words + 2 + MAX_LANES, dtype=np.uint32)
    for j in range(n_words):
        words[j] = np.uint32(coded[2 * j]) | (np.uint32(coded[2 * j + 1]) << np.uint32(8))
    return words


@njit(cache=True, nogil=True)
def _decode_segment(
    s: int,
    words: np.ndarray,  # from ``_words``
    stream: Stream,
    tables: Tables,
    col_base: np.ndarray,  # (K,) int64: first slot of each column's table
    t_sym: int,  # codes in the segment
    flat: np.ndarray,  # int32 output: the segment's codes go to flat[o : o + t_sym]
    o: int,
) -> int:
    """Decode segment ``s`` (tokens and escapes); returns a status code.

    Each step runs in two passes over its lanes (symbols, then refills), which gives the same
    result as one pass because lanes interact only through the word position.
    """
    k = col_base.shape[0]
    esc_bits = stream.esc_bits
    table = tables.table
    total_bits = (esc_bits.shape[0] - 8) * 8
    lanes = tables.seg_lanes[s]
    p0 = stream.seg_off[s]
    end = stream.seg_off[s + 1]
    if p0 + 4 * lanes > end or (end - p0) % 2 != 0 or p0 % 2 != 0:
        return E_HEADER
    ebit = stream.esc_off[s]
    ebit_end = stream.esc_off[s + 1]
    if ebit < 0 or ebit_end > total_bits or ebit > ebit_end:
        return E_HEADER
    x = np.empty(lanes, dtype=np.uint32)
    for lane in range(lanes):
        q = (p0 >> 1) + 2 * lane
        x[lane] = words[q] | (words[q + 1] << np.uint32(16))
    wp = (p0 >> 1) + 2 * lanes
    w_end = end >> 1
    col = 0
    steps = (t_sym + lanes - 1) // lanes
    for step in range(steps):
        r = min(lanes, t_sym - step * lanes)
        # Phase 1: every lane's symbol and state step. The lanes are independent here, so their
        # table loads overlap (and vectorise when the step does not wrap around a row); only
        # the refill below is serial. Escapes are rare: they are resolved afterwards, in order.
        esc = False
        if col + r <= k:
            for lane in range(r):
                xl = x[lane]
                ent = table[col_base[col + lane] + (xl & np.uint32(TOTAL - 1))]
                tok = np.int32(ent & np.uint32(0xFF)) - 128
                x[lane] = (((ent >> np.uint32(20)) + np.uint32(1)) * (xl >> np.uint32(PRECISION))
                           + ((ent >> np.uint32(8)) & np.uint32(0xFFF)))
                flat[o + lane] = tok
                esc |= np.uint32(tok + DIRECT_MAX) > np.uint32(2 * DIRECT_MAX)
            col += r
            if col == k:
                col = 0
        else:
            for lane in range(r):
                xl = x[lane]
                ent = table[col_base[col] + (xl & np.uint32(TOTAL - 1))]
                tok = np.int32(ent & np.uint32(0xFF)) - 128
                x[lane] = (((ent >> np.uint32(20)) + np.uint32(1)) * (xl >> np.uint32(PRECISION))
                           + ((ent >> np.uint32(8)) & np.uint32(0xFFF)))
                flat[o + lane] = tok
                esc |= np.uint32(tok + DIRECT_MAX) > np.uint32(2 * DIRECT_MAX)
                col += 1
                if col == k:
                    col = 0
        if esc:
            for i in range(o, o + r):
                tok = flat[i]
                if tok > DIRECT_MAX or tok < -DIRECT_MAX:
                    m = abs(tok) - (DIRECT_MAX + 1)
                    octave = (m >> 1) + FIRST_OCTAVE
                    width = octave - 1
                    if ebit + width > ebit_end:
                        return E_ESCAPE
                    byte = ebit >> 3
                    window = np.uint64(0)
                    for b in range(5):  # width <= 30 bits plus a 7-bit shift fit in 5 bytes
                        window |= np.uint64(esc_bits[byte + b]) << np.uint64(8 * b)
                    raw = np.int64((window >> np.uint64(ebit & 7))
                                   & np.uint64((1 << width) - 1))
                    ebit += width
                    mag = (np.int64(1) << octave) | (np.int64(m & 1) << (octave - 1)) | raw
                    if mag > 2147483647 + (1 if tok < 0 else 0):
                        return E_ESCAPE
                    flat[i] = np.int32(-mag if tok < 0 else mag)
        o += r
        # Phase 2: refill in lane order (the order the encoder wrote the words in). The next
        # word is always read (the word stream is padded) and only consumed when needed.
        for lane in range(r):
            xl = x[lane]
            need = np.uint32(xl < np.uint32(STATE_LOW))
            x[lane] = (xl << (need << np.uint32(4))) | (words[wp] & (np.uint32(0) - need))
            wp += need
        if wp > w_end:
            return E_SHORT
    if wp != w_end:
        return E_LONG
    if ebit != ebit_end:
        return E_ESCAPE
    for lane in range(lanes):
        if x[lane] != np.uint32(STATE_LOW):
            return E_STATE
    return OK


@njit(cache=True, nogil=True)
def _column_bases(col_table: np.ndarray) -> np.ndarray:
    col_base = np.empty(col_table.shape[0], dtype=np.int64)
    for c in range(col_table.shape[0]):
        col_base[c] = col_table[c] << PRECISION
    return col_base


@njit(cache=True, nogil=True)
def rans_decode_segments(
    stream: Stream,
    tables: Tables,
    out: np.ndarray,  # (N, K) int32: codes in permuted column order (output)
    errors: np.ndarray,  # (S,) int64 (output)
) -> None:
    """Decode every segment's tokens and escapes into codes; bounded work per code."""
    n_rows, k = out.shape
    words = _words(stream.coded)
    col_base = _column_bases(tables.col_table)
    flat = out.reshape(-1)
    for s in range(tables.seg_lanes.shape[0]):
        r0 = s * tables.seg_rows
        rows = min(tables.seg_rows, n_rows - r0)
        errors[s] = _decode_segment(s, words, stream, tables, col_base, rows * k, flat, r0 * k)


@njit(cache=True, nogil=True)
def rans_decode_pack_segments(
    stream: Stream,
    tables: Tables,
    n_rows: int,
    meta: np.ndarray,  # (NG, 8) int64: the stored group table (validated)
    out: PackTarget,
    errors: np.ndarray,  # (S,) int64 (output)
) -> None:
    """Decode the segments a few at a time into a reused buffer and pack each batch at once.

    The codes never exist as a whole ``(N, K)`` int32 matrix, only ``PACK_BATCH_CODES`` of them
    at a time (whole segments). Stops at the first bad segment (its status is ``E_RANGE`` when
    its codes do not fit the group table).
    """
    k = tables.col_table.shape[0]
    seg_rows = tables.seg_rows
    n_seg = tables.seg_lanes.shape[0]
    words = _words(stream.coded)
    col_base = _column_bases(tables.col_table)
    per_batch = max(1, PACK_BATCH_CODES // (seg_rows * k))
    buf = np.empty((min(n_rows, per_batch * seg_rows), k), dtype=np.int32)
    flat = buf.reshape(-1)
    for s0 in range(0, n_seg, per_batch):
        r0 = s0 * seg_rows
        for s in range(s0, min(n_seg, s0 + per_batch)):
            rows = min(seg_rows, n_rows - s * seg_rows)
            err = _decode_segment(s, words, stream, tables, col_base, rows * k, flat,
                                  (s - s0) * seg_rows * k)
            errors[s] = err
            if err != OK:
                return
        n_local = min(n_rows, r0 + per_batch * seg_rows) - r0
        err = pack_rows(buf, n_local, r0, meta, out)
        if err != OK:
            errors[s0] = err
            return


# ---------------------------------------------------------------------------- tokens
@njit(cache=True, nogil=True)
def _token(z: int) -> int:
    mag = abs(z)
    if mag <= DIRECT_MAX:
        return z
    octave = 0
    v = mag
    while v > 1:
        v >>= 1
        octave += 1
    h = (mag >> (octave - 1)) & 1
    t = DIRECT_MAX + 1 + 2 * (octave - FIRST_OCTAVE) + h
    return -t if z < 0 else t


@njit(cache=True, nogil=True)
def tokenize_histogram(
    codes: np.ndarray,  # (N, K) int32
    tokens: np.ndarray,  # (N, K) int16 (output)
    hist: np.ndarray,  # (P, K, ALPHABET) int64 (output, zero-filled): one histogram per part
) -> None:
    """Tokens of every code (``_tokens.tokenize``) and per-column token histograms.

    The rows are split into ``P`` parts counted in parallel; the caller sums ``hist`` over P.
    """
    n_rows, k = codes.shape
    parts = hist.shape[0]
    alphabet = hist.shape[2]
    center = alphabet // 2
    for part in range(parts):
        r0 = n_rows * part // parts
        r1 = n_rows * (part + 1) // parts
        for r in range(r0, r1):
            for c in range(k):
                t = _token(np.int64(codes[r, c]))
                tokens[r, c] = t
                hist[part, c, t + center] += 1


# ---------------------------------------------------------------------------- statistics
@njit(cache=True, nogil=True)
def _entropy_of(values: np.ndarray, buf: np.ndarray) -> float:
    """Plug-in entropy (bits) of ``values`` (int64); ``buf`` is scratch of at least ``values``'s
    size. Counts with a histogram when the range is small, else with a sort."""
    n = values.shape[0]
    lo, hi = values.min(), values.max()
    total = 0.0
    if hi - lo < 4 * n + 64:
        hist = np.zeros(hi - lo + 1, dtype=np.int64)
        for i in range(n):
            hist[values[i] - lo] += 1
        for c in hist:
            if c:
                p = c / n
                total -= p * np.log2(p)
        return total
    buf[:n] = np.sort(values)
    run = 1
    for i in range(1, n + 1):
        if i < n and buf[i] == buf[i - 1]:
            run += 1
        else:
            p = run / n
            total -= p * np.log2(p)
            run = 1
    return total


@njit(cache=True, nogil=True)
def _block_entropies(codes: np.ndarray, c0: int, c1: int, out: np.ndarray) -> None:
    """Plug-in entropy of columns ``c0..c1-1`` (a block, so that each row read is one cache
    line): one pass for the ranges, one for histograms; a sort for a column whose range is
    much wider than its row count."""
    n_rows = codes.shape[0]
    width = c1 - c0
    lo = np.full(width, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(width, np.iinfo(np.int64).min, dtype=np.int64)
    for r in range(n_rows):
        for j in range(width):
            v = np.int64(codes[r, c0 + j])
            lo[j] = min(lo[j], v)
            hi[j] = max(hi[j], v)
    offsets = np.zeros(width + 1, dtype=np.int64)
    for j in range(width):
        span = hi[j] - lo[j] + 1
        offsets[j + 1] = offsets[j] + (span if span <= 4 * n_rows + 64 else 0)
    hist = np.zeros(offsets[width], dtype=np.int64)
    for r in range(n_rows):
        for j in range(width):
            if offsets[j + 1] > offsets[j]:
                hist[offsets[j] + codes[r, c0 + j] - lo[j]] += 1
    for j in range(width):
        if offsets[j + 1] > offsets[j]:
            h = 0.0
            for i in range(offsets[j], offsets[j + 1]):
                if hist[i]:
                    p = hist[i] / n_rows
                    h -= p * np.log2(p)
            out[c0 + j] = h
        else:
            vals = np.empty(n_rows, dtype=np.int64)
            for r in range(n_rows):
                vals[r] = codes[r, c0 + j]
            out[c0 + j] = _entropy_of(vals, np.empty(n_rows, dtype=np.int64))


@njit(cache=True, nogil=True)
def code_statistics(codes: np.ndarray, live: np.ndarray) -> tuple:
    """Entropies of a code matrix, as ``watersic_hf.algorithm.entropy`` defines them.

    Args:
        codes: ``(N, K)`` int32.
        live: ``(K,)`` bool, the columns counted by the pooled entropy.

    Returns:
        ``(pooled, per_column)``: plug-in entropy (bits per code) of one histogram over the live
        columns, and the mean over all columns of each column's own plug-in entropy.
    """
    n_rows, k = codes.shape
    col_h = np.zeros(k, dtype=np.float64)
    n_blocks = (k + 15) // 16
    for b in range(n_blocks):
        _block_entropies(codes, b * 16, min(k, b * 16 + 16), col_h)
    n_live = 0
    for c in range(k):
        if live[c]:
            n_live += 1
    pooled = 0.0
    if n_live:
        flat = np.empty(n_rows * n_live, dtype=np.int64)
        j = 0
        for r in range(n_rows):
            for c in range(k):
                if live[c]:
                    flat[j] = codes[r, c]
                    j += 1
        pooled = _entropy_of(flat, np.empty(flat.shape[0], dtype=np.int64))
    return pooled, col_h.mean()
