"""Compiled (numba) loops of the packed in-memory format (see ``watersic_hf.packing``).

* :func:`choose_groups`: the width / base / escape choice of every 32-column group (the search of
  ``packing._choose_group``, same result);
* :func:`count_escapes`, :func:`pack_words`, :func:`pack_escape_fields`: codes → packed words with a
  given group table (used after the choice, and by checkpoint loading with a stored table);
* :func:`count_markers`, :func:`unpack_words`: packed words → escape counts / codes.

All loops work on NumPy arrays in permuted column order and release the GIL; they are serial,
and callers parallelise over layers with threads (see ``storage._jit`` for why). They never
raise: a status code (0 = fine) is written to an ``errors`` array (see ``ERRORS``) that the
caller turns into a ``ValueError``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, E_RANGE = 0, 5
ERRORS = {E_RANGE: "a code does not fit the stored packing layout (corrupted or crafted layout)"}
MAX_WIDTH = 16


@njit(cache=True, nogil=True)
def count_escapes(
    codes: np.ndarray,  # (N, K) int32, permuted column order
    meta: np.ndarray,  # (NG, 8) int64: group metadata (packing.META_* fields)
    counts: np.ndarray,  # (NGE, NC) int64 (output): escapes of each slot in each 32-row chunk
) -> None:
    """Count the codes of every escape group that fall outside its main range, per row chunk."""
    n_rows, k = codes.shape
    n_chunks = counts.shape[1]
    for c in range(n_chunks):
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


@njit(cache=True, nogil=True)
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
    for c in range(n_chunks):
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
    :func:`pack_words`); the caller has validated the tensors."""
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
