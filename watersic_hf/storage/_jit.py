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

import numpy as np
from numba import njit

PRECISION = 12
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 16
DIRECT_MAX = 31
FIRST_OCTAVE = 5
MAX_LANES = 64  # lanes per segment (``_segments.MAX_SEGMENT_LANES``)

# status codes written by the compiled loops (see ``ERRORS``)
OK, E_SHORT, E_LONG, E_STATE, E_ESCAPE, E_HEADER = 0, 1, 2, 3, 4, 6
ERRORS = {
    E_SHORT: "the stream ends before the last code (truncated?)",
    E_LONG: "the stream has unread words (corrupted?)",
    E_STATE: "the rANS decoder did not return to its initial state (corrupted stream)",
    E_ESCAPE: "the escape bits do not match the escape codes (corrupted stream)",
    E_HEADER: "the segment table points outside the stream (corrupted header)",
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
@njit(cache=True, nogil=True)
def rans_decode_segments(
    coded: np.ndarray,  # (C,) uint8: the concatenated segments
    seg_off: np.ndarray,  # (S + 1,) int64: byte offsets of the segments in ``coded``
    esc_bits: np.ndarray,  # (E,) uint8: raw escape bits, LSB first, plus 8 zero bytes of slack
    esc_off: np.ndarray,  # (S + 1,) int64: bit offset of each segment's escapes
    table: np.ndarray,  # (n_tables * TOTAL,) uint32: see ``_segments.decoder_table``
    col_table: np.ndarray,  # (K,) int64: table of each (permuted) column
    seg_rows: int,
    seg_lanes: np.ndarray,  # (S,) int64
    out: np.ndarray,  # (N, K) int32: codes in permuted column order (output)
    errors: np.ndarray,  # (S,) int64 (output)
) -> None:
    """Decode every segment's tokens and escapes into codes; bounded work per code.

    The inner step is branch-free except for the rare escape: the next word is always read (the
    word stream is padded) and only consumed when the state needs it.
    """
    n_rows, k = out.shape
    n_seg = seg_lanes.shape[0]
    total_bits = (esc_bits.shape[0] - 8) * 8
    flat = out.reshape(-1)
    # 16-bit words at every even offset (segments start at even offsets). A step may read up to
    # one word per lane past its segment before the end-of-step check; the slack keeps those
    # reads inside the array (the format caps lanes at MAX_LANES).
    n_words = coded.shape[0] // 2
    words = np.zeros(n_words + 2 + MAX_LANES, dtype=np.uint32)
    for j in range(n_words):
        words[j] = np.uint32(coded[2 * j]) | (np.uint32(coded[2 * j + 1]) << np.uint32(8))
    col_base = np.empty(k, dtype=np.int64)
    for c in range(k):
        col_base[c] = col_table[c] << PRECISION
    for s in range(n_seg):
        r0 = s * seg_rows
        rows = min(seg_rows, n_rows - r0)
        t_sym = rows * k
        lanes = seg_lanes[s]
        p0 = seg_off[s]
        end = seg_off[s + 1]
        if p0 + 4 * lanes > end or (end - p0) % 2 != 0 or p0 % 2 != 0:
            errors[s] = E_HEADER
            continue
        ebit = esc_off[s]
        ebit_end = esc_off[s + 1]
        if ebit < 0 or ebit_end > total_bits or ebit > ebit_end:
            errors[s] = E_HEADER
            continue
        x = np.empty(lanes, dtype=np.uint32)
        for lane in range(lanes):
            q = (p0 >> 1) + 2 * lane
            x[lane] = words[q] | (words[q + 1] << np.uint32(16))
        wp = (p0 >> 1) + 2 * lanes
        w_end = end >> 1
        err = OK
        col = 0
        o = r0 * k
        steps = (t_sym + lanes - 1) // lanes
        for step in range(steps):
            r = min(lanes, t_sym - step * lanes)
            for lane in range(r):
                xl = x[lane]
                ent = table[col_base[col] + (xl & np.uint32(TOTAL - 1))]
                tok = np.int32(ent & np.uint32(0xFF)) - 128
                xl = (((ent >> np.uint32(20)) + np.uint32(1)) * (xl >> np.uint32(PRECISION))
                      + ((ent >> np.uint32(8)) & np.uint32(0xFFF)))
                need = np.uint32(xl < np.uint32(STATE_LOW))
                xl = (xl << (need << np.uint32(4))) | (words[wp] & (np.uint32(0) - need))
                wp += need
                x[lane] = xl
                flat[o] = tok
                if tok > DIRECT_MAX or tok < -DIRECT_MAX:
                    m = abs(tok) - (DIRECT_MAX + 1)
                    octave = (m >> 1) + FIRST_OCTAVE
                    width = octave - 1
                    if ebit + width > ebit_end:
                        err = E_ESCAPE
                        break
                    byte = ebit >> 3
                    window = np.uint64(0)
                    for b in range(5):  # width <= 30 bits plus a 7-bit shift fit in 5 bytes
                        window |= np.uint64(esc_bits[byte + b]) << np.uint64(8 * b)
                    raw = np.int64((window >> np.uint64(ebit & 7))
                                   & np.uint64((1 << width) - 1))
                    ebit += width
                    mag = (np.int64(1) << octave) | (np.int64(m & 1) << (octave - 1)) | raw
                    if mag > 2147483647 + (1 if tok < 0 else 0):
                        err = E_ESCAPE
                        break
                    flat[o] = np.int32(-mag if tok < 0 else mag)
                o += 1
                col += 1
                if col == k:
                    col = 0
            if err != OK:
                break
            if wp > w_end:
                err = E_SHORT
                break
        if err == OK:
            if wp != w_end:
                err = E_LONG
            elif ebit != ebit_end:
                err = E_ESCAPE
            else:
                for lane in range(lanes):
                    if x[lane] != np.uint32(STATE_LOW):
                        err = E_STATE
        errors[s] = err


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
