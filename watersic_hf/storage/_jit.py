"""Compiled (numba) loops of the format-v2 entropy codec and of the layout-driven packer.

Everything here works on NumPy arrays, releases the GIL and runs its outer loop in parallel
(``prange``) over independent work items: rANS *segments* for the coder, 32-row *chunks* for the
packer. numba is a JIT with prebuilt wheels, so ``pip install`` needs no compiler; compiled code
is cached on disk (``cache=True``) so a process pays the compile time once per machine.

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

import numba
import numpy as np
from numba import njit, prange

PRECISION = 12
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 16
DIRECT_MAX = 31
FIRST_OCTAVE = 5

# status codes written by the compiled loops (see ``ERRORS``)
OK, E_SHORT, E_LONG, E_STATE, E_ESCAPE, E_RANGE, E_HEADER = 0, 1, 2, 3, 4, 5, 6
ERRORS = {
    E_SHORT: "the stream ends before the last code (truncated?)",
    E_LONG: "the stream has unread words (corrupted?)",
    E_STATE: "the rANS decoder did not return to its initial state (corrupted stream)",
    E_ESCAPE: "the escape bits do not match the escape codes (corrupted stream)",
    E_RANGE: "a code does not fit the stored packing layout (corrupted or crafted layout)",
    E_HEADER: "the segment table points outside the stream (corrupted header)",
}


def set_threads(n: int) -> None:
    """Use ``n`` threads (clamped to numba's maximum) for the parallel loops."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# ---------------------------------------------------------------------------- rANS encoder
@njit(cache=True, nogil=True, parallel=True)
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
    for s in prange(n_seg):
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
@njit(cache=True, nogil=True, parallel=True)
def rans_decode_segments(
    coded: np.ndarray,  # (C,) uint8: the concatenated segments
    seg_off: np.ndarray,  # (S + 1,) int64: byte offsets of the segments in ``coded``
    esc_bits: np.ndarray,  # (E,) uint8: raw escape bits, LSB first, plus 8 zero bytes of slack
    esc_off: np.ndarray,  # (S + 1,) int64: bit offset of each segment's escapes
    sym: np.ndarray,  # (n_tables * TOTAL,) int8: slot -> token
    fb: np.ndarray,  # (n_tables * TOTAL,) uint32: slot -> freq << 16 | (slot - start)
    col_table: np.ndarray,  # (K,) int64: table of each (permuted) column
    seg_rows: int,
    seg_lanes: np.ndarray,  # (S,) int64
    out: np.ndarray,  # (N, K) int32: codes in permuted column order (output)
    errors: np.ndarray,  # (S,) int64 (output)
) -> None:
    """Decode every segment's tokens and escapes into codes; bounded work per code."""
    n_rows, k = out.shape
    n_seg = seg_lanes.shape[0]
    total_bits = (esc_bits.shape[0] - 8) * 8
    for s in prange(n_seg):
        r0 = s * seg_rows
        rows = min(seg_rows, n_rows - r0)
        t_sym = rows * k
        lanes = seg_lanes[s]
        p0 = seg_off[s]
        end = seg_off[s + 1]
        if p0 + 4 * lanes > end or (end - p0 - 4 * lanes) % 2 != 0:
            errors[s] = E_HEADER
            continue
        x = np.empty(lanes, dtype=np.uint32)
        for lane in range(lanes):
            q = p0 + 4 * lane
            x[lane] = (np.uint32(coded[q]) | (np.uint32(coded[q + 1]) << np.uint32(8))
                       | (np.uint32(coded[q + 2]) << np.uint32(16))
                       | (np.uint32(coded[q + 3]) << np.uint32(24)))
        wp = p0 + 4 * lanes
        ebit = esc_off[s]
        ebit_end = esc_off[s + 1]
        if ebit < 0 or ebit_end > total_bits or ebit > ebit_end:
            errors[s] = E_HEADER
            continue
        err = OK
        row = r0
        col = 0
        steps = (t_sym + lanes - 1) // lanes
        for step in range(steps):
            r = min(lanes, t_sym - step * lanes)
            for lane in range(r):
                xl = x[lane]
                slot = (col_table[col] << PRECISION) + (xl & np.uint32(TOTAL - 1))
                tok = np.int32(sym[slot])
                ent = fb[slot]
                xl = ((ent >> np.uint32(16)) * (xl >> np.uint32(PRECISION))
                      + (ent & np.uint32(0xFFFF)))
                if xl < np.uint32(STATE_LOW):
                    if wp + 2 > end:
                        err = E_SHORT
                        break
                    xl = (xl << np.uint32(16)) | np.uint32(coded[wp]) | (
                        np.uint32(coded[wp + 1]) << np.uint32(8))
                    wp += 2
                x[lane] = xl
                code = tok
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
                    code = np.int32(-mag if tok < 0 else mag)
                out[row, col] = code
                col += 1
                if col == k:
                    col = 0
                    row += 1
            if err != OK:
                break
        if err == OK:
            if wp != end:
                err = E_LONG
            elif ebit != ebit_end:
                err = E_ESCAPE
            else:
                for lane in range(lanes):
                    if x[lane] != np.uint32(STATE_LOW):
                        err = E_STATE
        errors[s] = err


# ---------------------------------------------------------------------------- layout packer
@njit(cache=True, nogil=True, parallel=True)
def count_escapes(
    codes: np.ndarray,  # (N, K) int32, permuted column order
    meta: np.ndarray,  # (NG, 8) int64: group metadata (packing.META_* fields)
    counts: np.ndarray,  # (NGE, NC) int64 (output): escapes of each slot in each 32-row chunk
) -> None:
    """Count the codes of every escape group that fall outside its main range, per row chunk."""
    n_rows, k = codes.shape
    n_chunks = counts.shape[1]
    for c in prange(n_chunks):
        for g in range(meta.shape[0]):
            slot = meta[g, 3]
            if slot < 0:
                continue
            lo = meta[g, 2]
            inner = (np.int64(1) << meta[g, 0]) - 1
            n = 0
            for r in range(c * 32, min(n_rows, c * 32 + 32)):
                for p in range(g * 32, min(k, g * 32 + 32)):
                    u = np.int64(codes[r, p]) - lo
                    if u < 0 or u >= inner:
                        n += 1
            counts[slot, c] = n


@njit(cache=True, nogil=True, parallel=True)
def pack_words(
    codes: np.ndarray,  # (N, K) int32, permuted column order
    meta: np.ndarray,  # (NG, 8) int64
    escape_base: np.ndarray,  # (NGE, NC) int64: escapes before each chunk, per slot
    slot_start: np.ndarray,  # (NGE,) int64: first index of each slot's escapes in ``esc_vals``
    packed: np.ndarray,  # (W, N) uint32 (output)
    esc_vals: np.ndarray,  # (total escapes,) int64 (output): escape fields t, per slot in order
    maxabs: np.ndarray,  # (NC, NG) int64 (output): largest |code| of each group in each chunk
    errors: np.ndarray,  # (NC,) int64 (output)
) -> None:
    """Write the main stream of every group and collect escape fields (see packing.py)."""
    n_rows, k = codes.shape
    n_chunks = errors.shape[0]
    for c in prange(n_chunks):
        err = OK
        for g in range(meta.shape[0]):
            b = meta[g, 0]
            woff = meta[g, 1]
            lo = meta[g, 2]
            slot = meta[g, 3]
            e = meta[g, 4]
            elo = meta[g, 5]
            inner = (np.int64(1) << b) - 1 if slot >= 0 else (np.int64(1) << b)
            nxt = 0
            if slot >= 0:
                nxt = slot_start[slot] + escape_base[slot, c]
            biggest = np.int64(0)
            for r in range(c * 32, min(n_rows, c * 32 + 32)):
                acc = np.uint64(0)
                nbits = 0
                w = woff
                for q in range(32):
                    p = g * 32 + q
                    u = np.int64(0)
                    if p < k:
                        z = np.int64(codes[r, p])
                        biggest = max(biggest, abs(z))
                        u = z - lo
                        if u < 0 or u >= inner:
                            if slot < 0:
                                err = E_RANGE
                                u = 0
                            else:
                                t = z - elo if z < lo else z - elo - inner
                                if t < 0 or t >= (np.int64(1) << e):
                                    err = E_RANGE
                                elif nxt >= esc_vals.shape[0]:
                                    err = E_RANGE
                                else:
                                    esc_vals[nxt] = t
                                    nxt += 1
                                u = inner
                    acc |= np.uint64(u) << np.uint64(nbits)
                    nbits += b
                    while nbits >= 32:
                        packed[w, r] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                        acc >>= np.uint64(32)
                        nbits -= 32
                        w += 1
            maxabs[c, g] = biggest
        errors[c] = err


@njit(cache=True, nogil=True)
def pack_escape_fields(
    esc_vals: np.ndarray,  # (total,) int64
    slot_start: np.ndarray,  # (NGE + 1,) int64
    slot_width: np.ndarray,  # (NGE,) int64
    slot_word: np.ndarray,  # (NGE,) int64: first word of each slot's field stream
    out: np.ndarray,  # (WE,) uint32 (output, zero-filled)
) -> int:
    """Lay every slot's escape fields end to end from its first word; returns 0 or E_RANGE."""
    for s in range(slot_width.shape[0]):
        e = slot_width[s]
        bit = slot_word[s] * 32
        for i in range(slot_start[s], slot_start[s + 1]):
            v = np.uint64(esc_vals[i])
            j = bit >> 5
            sh = bit & 31
            if e > 0:
                if j >= out.shape[0] or (sh + e > 32 and j + 1 >= out.shape[0]):
                    return E_RANGE
                out[j] |= np.uint32((v << np.uint64(sh)) & np.uint64(0xFFFFFFFF))
                if sh + e > 32:
                    out[j + 1] |= np.uint32(v >> np.uint64(32 - sh))
            bit += e
    return OK


@njit(cache=True, nogil=True, parallel=True)
def count_markers(
    packed: np.ndarray,  # (W, N) int32
    meta: np.ndarray,  # (NG, 8) int64
    k: int,
    counts: np.ndarray,  # (NGE, NC) int64 (output)
) -> None:
    """Count the escape markers of every escape group per 32-row chunk (validates packed files)."""
    n_rows = packed.shape[1]
    n_chunks = counts.shape[1]
    for c in prange(n_chunks):
        for g in range(meta.shape[0]):
            slot = meta[g, 3]
            if slot < 0:
                continue
            b = meta[g, 0]
            woff = meta[g, 1]
            marker = (np.uint64(1) << np.uint64(b)) - np.uint64(1)
            n = 0
            for r in range(c * 32, min(n_rows, c * 32 + 32)):
                for q in range(min(32, k - g * 32)):
                    bit = q * b
                    j = woff + (bit >> 5)
                    lo_w = np.uint64(np.uint32(packed[j, r]))
                    hi_w = np.uint64(0)
                    if (bit & 31) + b > 32:
                        hi_w = np.uint64(np.uint32(packed[j + 1, r]))
                    u = ((lo_w | (hi_w << np.uint64(32))) >> np.uint64(bit & 31)) & marker
                    if u == marker:
                        n += 1
            counts[slot, c] = n


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


@njit(cache=True, nogil=True, parallel=True)
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
    for part in prange(parts):
        r0 = n_rows * part // parts
        r1 = n_rows * (part + 1) // parts
        for r in range(r0, r1):
            for c in range(k):
                t = _token(np.int64(codes[r, c]))
                tokens[r, c] = t
                hist[part, c, t + center] += 1


@njit(cache=True, nogil=True, parallel=True)
def unpack_words(
    packed: np.ndarray,  # (W, N) int32
    meta: np.ndarray,  # (NG, 8) int64
    esc_words: np.ndarray,  # (WE,) int32
    escape_base: np.ndarray,  # (NGE, NC) int64
    out: np.ndarray,  # (N, K) int32 (output): codes in permuted column order
) -> None:
    """Decode a packed module's codes in permuted column order (the inverse of
    :func:`pack_words`); the caller has validated the tensors."""
    n_rows, k = out.shape
    n_chunks = (n_rows + 31) // 32
    for c in prange(n_chunks):
        for g in range(meta.shape[0]):
            b = meta[g, 0]
            woff = meta[g, 1]
            lo = meta[g, 2]
            slot = meta[g, 3]
            e = meta[g, 4]
            elo = meta[g, 5]
            eoff = meta[g, 6]
            mask = (np.uint64(1) << np.uint64(b)) - np.uint64(1)
            inner = (np.int64(1) << b) - 1
            nxt = np.int64(0)
            if slot >= 0:
                nxt = escape_base[slot, c]
            for r in range(c * 32, min(n_rows, c * 32 + 32)):
                for q in range(min(32, k - g * 32)):
                    bit = q * b
                    j = woff + (bit >> 5)
                    u = np.uint64(0)
                    if b > 0:
                        lo_w = np.uint64(np.uint32(packed[j, r]))
                        hi_w = np.uint64(0)
                        if (bit & 31) + b > 32:
                            hi_w = np.uint64(np.uint32(packed[j + 1, r]))
                        u = ((lo_w | (hi_w << np.uint64(32))) >> np.uint64(bit & 31)) & mask
                    z = lo + np.int64(u)
                    if slot >= 0 and np.int64(u) == inner:
                        pos = eoff * 32 + nxt * e
                        t = np.int64(0)
                        if e > 0:
                            wj = pos >> 5
                            w0 = np.uint64(np.uint32(esc_words[wj]))
                            w1 = np.uint64(0)
                            if (pos & 31) + e > 32:
                                w1 = np.uint64(np.uint32(esc_words[wj + 1]))
                            t = np.int64(((w0 | (w1 << np.uint64(32))) >> np.uint64(pos & 31))
                                         & ((np.uint64(1) << np.uint64(e)) - np.uint64(1)))
                        v = elo + t
                        z = v if v < lo else v + inner
                        nxt += 1
                    out[r, g * 32 + q] = np.int32(z)
