"""Compiled (numba) loops of the packed in-memory format (see ``watersic_hf.packing``).

* :func:`choose_groups`: the width / base / escape choice of every 32-column group (the search of
  ``packing._choose_group``, same result);
* :func:`pack_rows`: codes → packed words and escape fields with a given group table, one pass,
  32-row chunk by chunk (used after the choice, and by checkpoint loading with a stored table);
* :func:`count_markers`, :func:`unpack_words`: packed words → escape counts / codes.

All loops work on NumPy arrays in permuted column order and release the GIL; they are serial,
and callers parallelise over layers with threads (see ``storage._jit`` for why). They never
raise: a status code (0 = fine) is written to an ``errors`` array (see ``ERRORS``) that the
caller turns into a ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

OK, E_RANGE = 0, 5
ERRORS = {E_RANGE: "a code does not fit the stored packing layout (corrupted or crafted layout)"}
MAX_WIDTH = 16


class PackTarget(NamedTuple):
    """Outputs of packing one matrix with a given group table (numba takes it as one argument).

    ``slot_word`` and ``slot_count`` describe the escape streams: slot ``s`` writes its ``e``-bit
    fields from bit ``32 · slot_word[s]`` and must end at or before word ``slot_word[s + 1]``
    (``slot_word[-1]`` = all escape words).
    """

    packed: np.ndarray  # (W, N) uint32
    esc_words: np.ndarray  # (WE,) uint32, zero-filled
    escape_base: np.ndarray  # (NGE, NC) int64: escapes before each chunk, per slot
    biggest: np.ndarray  # (NG,) int64: largest |code| of each group so far
    slot_word: np.ndarray  # (NGE + 1,) int64
    slot_count: np.ndarray  # (NGE,) int64: escapes packed so far in each slot


@njit(cache=True, nogil=True)
def pack_rows(
    codes: np.ndarray,  # (>= R, K) int32: codes[i] is matrix row row0 + i, permuted order
    n_local: int,  # R: rows to pack (codes may be a larger reused buffer)
    row0: int,  # matrix row of codes[0], a multiple of 32
    meta: np.ndarray,  # (NG, 8) int64: group metadata (packing.META_* fields)
    out: PackTarget,
) -> int:
    """Pack whole 32-row chunks, in order, into ``out``; returns ``OK`` or ``E_RANGE``.

    One pass: every group's main words are written, and each escape's field goes straight to
    its slot's bit stream (numbered by ``out.slot_count``), so chunks must be packed in row order
    and a matrix can be packed piece by piece (the checkpoint decoder packs a few segments at a
    time). A code that does not fit the group (or a slot that would overflow its stored words)
    stops packing with ``E_RANGE``.
    """
    k = codes.shape[1]
    packed = out.packed
    for c0 in range(0, n_local, 32):
        chunk = (row0 + c0) // 32
        r_end = min(n_local, c0 + 32)
        for g in range(meta.shape[0]):
            b = meta[g, 0]
            lo = meta[g, 2]
            slot = meta[g, 3]
            inner = (np.int64(1) << b) - 1 if slot >= 0 else (np.int64(1) << b)
            if slot >= 0:
                out.escape_base[slot, chunk] = out.slot_count[slot]
            big = out.biggest[g]
            width = min(32, k - g * 32)
            for r in range(c0, r_end):
                acc = np.uint64(0)
                nbits = 0
                w = meta[g, 1]
                for q in range(32):
                    u = np.int64(0)
                    if q < width:
                        z = np.int64(codes[r, g * 32 + q])
                        big = max(big, abs(z))
                        u = z - lo
                        if u < 0 or u >= inner:
                            if slot < 0 or not _pack_escape(z, g, slot, meta, out):
                                return E_RANGE
                            u = inner
                    acc |= np.uint64(u) << np.uint64(nbits)
                    nbits += b
                    if nbits >= 32:  # b <= 16: at most one word per code
                        packed[w, row0 + r] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                        acc >>= np.uint64(32)
                        nbits -= 32
                        w += 1
            out.biggest[g] = big
    return OK


@njit(cache=True, nogil=True)
def _pack_escape(z: int, g: int, slot: int, meta: np.ndarray, out: PackTarget) -> bool:
    """Append code ``z`` of group ``g`` to its slot's escape fields; False if it does not fit."""
    b, lo, e, elo = meta[g, 0], meta[g, 2], meta[g, 4], meta[g, 5]
    inner = (np.int64(1) << b) - 1
    t = z - elo if z < lo else z - elo - inner
    cnt = out.slot_count[slot]
    bitpos = out.slot_word[slot] * 32 + cnt * e
    if t < 0 or t >= (np.int64(1) << e) or bitpos + e > out.slot_word[slot + 1] * 32:
        return False
    if e > 0:
        j = bitpos >> 5
        sh = np.uint64(bitpos & 31)
        v = np.uint64(t)
        out.esc_words[j] |= np.uint32((v << sh) & np.uint64(0xFFFFFFFF))
        if (bitpos & 31) + e > 32:
            out.esc_words[j + 1] |= np.uint32(v >> (np.uint64(32) - sh))
    out.slot_count[slot] = cnt + 1
    return True


@njit(cache=True, nogil=True)
def count_markers(
    packed: np.ndarray,  # (W, N) int32
    meta: np.ndarray,  # (NG, 8) int64
    k: int,
    counts: np.ndarray,  # (NGE, NC) int64 (output)
) -> None:
    """Count the escape markers of every escape group per 32-row chunk (validates packed files)."""
    n_rows = packed.shape[1]
    n_chunks = counts.shape[1]
    for c in range(n_chunks):
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


@njit(cache=True, nogil=True)
def unpack_words(
    packed: np.ndarray,  # (W, N) int32
    meta: np.ndarray,  # (NG, 8) int64
    esc_words: np.ndarray,  # (WE,) int32
    escape_base: np.ndarray,  # (NGE, NC) int64
    out: np.ndarray,  # (N, K) int32 (output): codes in permuted column order
) -> None:
    """Decode a packed module's codes in permuted column order (the inverse of
    :func:`pack_rows`); the caller has validated the tensors."""
    n_rows, k = out.shape
    n_chunks = (n_rows + 31) // 32
    for c in range(n_chunks):
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


# ---------------------------------------------------------------------------- layout choice
@njit(cache=True, nogil=True)
def _bit_length(v: int) -> int:
    n = 0
    while v > 0:
        n += 1
        v >>= 1
    return n


@njit(cache=True, nogil=True)
def _choose_one(vals: np.ndarray, n_chunks: int) -> tuple:
    """``packing._choose_group`` for one group's codes (int64, padding excluded):
    ``(b, lo, uses_escapes)`` minimising the group's bits, with the same tie rules."""
    n = vals.shape[0]
    lo_v, hi_v = vals.min(), vals.max()
    # unique values and their counts: a histogram when the range is small, else a sort
    uniq = np.empty(n, dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    u = 0
    if hi_v - lo_v < (1 << 22):
        hist = np.zeros(hi_v - lo_v + 1, dtype=np.int64)
        for i in range(n):
            hist[vals[i] - lo_v] += 1
        for v in range(hist.shape[0]):
            if hist[v]:
                uniq[u] = lo_v + v
                counts[u] = hist[v]
                u += 1
    else:
        srt = np.sort(vals)
        for i in range(n):
            if i == 0 or srt[i] != srt[i - 1]:
                uniq[u] = srt[i]
                counts[u] = 0
                u += 1
            counts[u - 1] += 1
    vmin, vmax = uniq[0], uniq[u - 1]
    cum = np.zeros(u + 1, dtype=np.int64)
    for i in range(u):
        cum[i + 1] = cum[i] + counts[i]
    full = _bit_length(vmax - vmin)
    best_cost = np.int64(-1)
    best_b, best_lo, best_esc = 0, vmin, False
    if full <= MAX_WIDTH:
        best_cost, best_b, best_lo, best_esc = full * n, full, vmin, False
    for b in range(1, min(MAX_WIDTH, full) + 1):
        inner = (np.int64(1) << b) - 1
        j = 0
        top_cost = np.int64(-1)
        top_lo = np.int64(0)
        for i in range(u):
            # j: first unique value above uniq[i] + inner - 1 (searchsorted right)
            if j < i:
                j = i
            while j < u and uniq[j] <= uniq[i] + inner - 1:
                j += 1
            n_esc = n - (cum[j] - cum[i])
            if n_esc <= 0:
                continue
            below = uniq[i - 1] - vmin if i > 0 else np.int64(0)
            above = vmax - vmin - inner if j < u else below
            e = _bit_length(max(below, above))
            cost = b * n + e * n_esc + 32 * n_chunks
            if top_cost < 0 or cost < top_cost:
                top_cost, top_lo = cost, uniq[i]
        if top_cost >= 0 and (best_cost < 0 or top_cost < best_cost):
            best_cost, best_b, best_lo, best_esc = top_cost, b, top_lo, True
    return best_b, best_lo, best_esc


@njit(cache=True, nogil=True)
def choose_groups(
    codes: np.ndarray,  # (N, K) int32, permuted column order
    n_chunks: int,
    meta: np.ndarray,  # (NG, 8) int64 (output): width, -, lo, has-escapes, e, esc_lo, count, max
) -> None:
    """Choose every group's width, base and escape fields (offsets are filled by the caller).

    Per group ``g``: ``meta[g, 0]`` width, ``[2]`` lo, ``[3]`` 1 if it uses escapes else -1,
    ``[4]`` escape field width, ``[5]`` escape base, ``[6]`` number of escapes, ``[7]`` max |code|.
    """
    n_rows, k = codes.shape
    for g in range(meta.shape[0]):
        c0 = g * 32
        width = min(32, k - c0)
        vals = np.empty(n_rows * width, dtype=np.int64)
        biggest = np.int64(0)
        for r in range(n_rows):
            for q in range(width):
                v = np.int64(codes[r, c0 + q])
                vals[r * width + q] = v
                biggest = max(biggest, abs(v))
        b, lo, esc = _choose_one(vals, n_chunks)
        meta[g, 0] = b
        meta[g, 2] = lo
        meta[g, 3] = 1 if esc else -1
        meta[g, 7] = biggest
        if esc:
            inner = (np.int64(1) << b) - 1
            esc_lo = lo
            count = 0
            for i in range(vals.shape[0]):
                v = vals[i]
                if v < lo or v >= lo + inner:
                    esc_lo = min(esc_lo, v)
                    count += 1
            t_max = np.int64(0)
            for i in range(vals.shape[0]):
                v = vals[i]
                if v < lo:
                    t_max = max(t_max, v - esc_lo)
                elif v >= lo + inner:
                    t_max = max(t_max, v - esc_lo - inner)
            meta[g, 4] = _bit_length(t_max)
            meta[g, 5] = esc_lo
            meta[g, 6] = count
