"""Probability model: a few shared token tables, one chosen per column.

WaterSIC columns differ mainly in spread, so columns of similar spread can share one table at
almost no loss, while a table per column would cost far more side information than it saves at
realistic row counts. The encoder clusters columns (Lloyd iterations on the exact code length)
for several table counts and keeps the count with the smallest total: stream + tables + column
indices. Each table stores its token range and one byte per token, a quantized ``-log2 p`` in
1/8-bit steps; a *symmetric* table (``p(-t) = p(t)``, which WaterSIC codes nearly satisfy) stores
only the magnitudes ``0..hi`` and so costs half. The encoder picks, per table, whichever form
gives the smaller stream + table size. The decoder rebuilds the integer frequencies with integer
arithmetic only, so encoder and decoder agree bit for bit on every platform.

Serialized table: ``[lo + 85, size - 1, q...]`` (asymmetric; ``lo + 85 <= 170``) or
``[255, hi, q_0 .. q_hi]`` (symmetric, tokens ``-hi..hi``).
"""

from __future__ import annotations

import functools
import math
from functools import cached_property

import numpy as np

from ._tokens import ALPHABET, MAX_TOKEN

PRECISION = 12  # probabilities are multiples of 2**-12 (rANS frequency resolution)
TOTAL = 1 << PRECISION
MAX_TABLES = 64
TABLE_HEADER_BYTES = 2
_SYMMETRIC_MARK = 255  # first header byte of a symmetric table (asymmetric ones use 0..170)
_ABSENT = 255  # quantized-log byte meaning "token not seen" (gets the minimum frequency)
# round(2**(32 - r / 8)) for r = 0..7, written out so no platform's exp/log enters decoding.
_POW2_EIGHTHS = np.array(
    [4294967296, 3938502376, 3611622603, 3311872529, 3037000500, 2784941738, 2553802834,
     2341847524], dtype=np.int64)
# Table counts tried, in order; the search stops at the first count that does worse than the
# one before (the total size is close to convex in the count). Measured on realistic codes,
# the finer grid of format v1 (12 counts, 8 iterations) saved under 0.001 bit per code.
_CANDIDATE_TABLE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
_LLOYD_ITERATIONS = 6
_SEARCH_ITERATIONS = 1  # Lloyd steps per count while the table count is being chosen
_OUT_OF_RANGE = 1.0e12  # code length (bits) of a token a table cannot code


class Table:
    """One token table.

    Args:
        lo (`int`): first token covered (``-hi`` for a symmetric table).
        qlog (`np.ndarray`, uint8): quantized ``-8 log2 p`` per stored token: tokens
            ``lo, lo + 1, ...`` (asymmetric) or magnitudes ``0, 1, ..., hi`` (symmetric).
        symmetric (`bool`): whether ``qlog`` holds magnitudes only.
    """

    def __init__(self, lo: int, qlog: np.ndarray, symmetric: bool = False) -> None:
        self.lo = int(lo)
        self.qlog = np.asarray(qlog, dtype=np.uint8)
        self.symmetric = bool(symmetric)

    @property
    def size(self) -> int:
        """Number of tokens covered (``lo .. lo + size - 1``)."""
        return 2 * self.qlog.size - 1 if self.symmetric else int(self.qlog.size)

    @property
    def hi(self) -> int:
        return self.lo + self.size - 1

    @property
    def nbytes(self) -> int:
        """Serialized size in bytes."""
        return TABLE_HEADER_BYTES + int(self.qlog.size)

    @cached_property
    def full_qlog(self) -> np.ndarray:
        """Quantized log-probability of every covered token (uint8, ``size`` entries)."""
        if not self.symmetric:
            return self.qlog
        return np.concatenate([self.qlog[:0:-1], self.qlog])

    @cached_property
    def freq(self) -> np.ndarray:
        """Integer frequencies summing to ``2**PRECISION`` (int64, one per covered token)."""
        return quantized_frequencies(self.full_qlog)

    def frequencies(self) -> np.ndarray:
        """Same as :attr:`freq`."""
        return self.freq

    def serialize(self) -> np.ndarray:
        """Header and table bytes (uint8)."""
        if self.symmetric:
            head = [_SYMMETRIC_MARK, self.qlog.size - 1]
        else:
            head = [self.lo + MAX_TOKEN, self.size - 1]
        return np.concatenate([np.array(head, dtype=np.uint8), self.qlog])


def quantized_frequencies(qlog: np.ndarray) -> np.ndarray:
    """Integer frequencies (sum ``2**PRECISION``, each >= 1) from quantized log-probabilities.

    Integer-only so that the encoder and every decoder derive identical tables.

    Args:
        qlog (`np.ndarray` of shape `(A,)`, uint8): ``round(-8 log2 p)``, 255 = unseen.

    Returns:
        `np.ndarray` of shape `(A,)`, int64.
    """
    q = qlog.astype(np.int64)
    a = q.size
    w = np.where(q == _ABSENT, 0, _POW2_EIGHTHS[q & 7] >> (q >> 3))
    total_w = int(w.sum())
    if total_w == 0:
        w = np.ones(a, dtype=np.int64)
        total_w = a
    spare = TOTAL - a  # every token first gets frequency 1, the rest is shared by weight
    scaled = w * spare  # < 2**44
    freq = 1 + scaled // total_w
    short = TOTAL - int(freq.sum())
    if short:
        # Largest remainders first; ties go to the lower token (lexsort keys are stable).
        order = np.lexsort((np.arange(a), -(scaled % total_w)))
        freq[order[:short]] += 1
    return freq


def quantize_counts(counts: np.ndarray) -> np.ndarray:
    """Quantized log-probabilities (uint8) of a histogram; zero counts become "unseen"."""
    counts = np.asarray(counts, dtype=np.float64)
    q = np.full(counts.size, _ABSENT, dtype=np.uint8)
    seen = counts > 0
    if seen.any():
        p = counts[seen] / counts.sum()
        q[seen] = np.clip(np.rint(-8.0 * np.log2(p)), 0, _ABSENT - 1).astype(np.uint8)
    return q


def table_from_counts(counts: np.ndarray, lo: int, hi: int) -> Table:
    """Table covering tokens ``lo..hi`` fitted to ``counts`` (indexed by token + 85).

    Both the asymmetric and the symmetric form are fitted; the one with the smaller
    ``code length of counts + 8 * table bytes`` is returned.
    """
    counts = np.asarray(counts, dtype=np.float64)
    asym = Table(lo, quantize_counts(counts[lo + MAX_TOKEN: hi + MAX_TOKEN + 1]))
    m = max(-lo, hi)
    mags = counts[MAX_TOKEN: MAX_TOKEN + m + 1].copy()
    mags[1:] += counts[MAX_TOKEN - m: MAX_TOKEN][::-1]
    mags[1:] *= 0.5  # p(t) = p(-t) = (c(t) + c(-t)) / 2 for t != 0
    sym = Table(-m, quantize_counts(mags), symmetric=True)
    return min((asym, sym), key=lambda t: _table_cost(t, counts))


def _table_cost(table: Table, counts: np.ndarray) -> float:
    """Bits to code ``counts`` with ``table`` plus the table's own bytes."""
    seg = counts[table.lo + MAX_TOKEN: table.hi + MAX_TOKEN + 1]
    return float(seg @ (PRECISION - np.log2(table.freq))) + 8 * table.nbytes


def column_bits_per_index(n_tables: int) -> int:
    """Bits used to store one column's table index."""
    return 0 if n_tables <= 1 else math.ceil(math.log2(n_tables))


def _code_lengths(tables: list[Table]) -> np.ndarray:
    """Matrix ``(ALPHABET, len(tables))`` of per-token code lengths in bits."""
    out = np.full((ALPHABET, len(tables)), _OUT_OF_RANGE)
    for g, t in enumerate(tables):
        start = t.lo + MAX_TOKEN
        out[start: start + t.size, g] = PRECISION - np.log2(t.freq)
    return out


def _frequencies_batch(qlog: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """:func:`quantized_frequencies` of many tables at once.

    Args:
        qlog (`np.ndarray` of shape `(g, ALPHABET)`, int64): quantized log-probabilities,
            aligned so that column ``t + 85`` is token ``t``.
        inside (`np.ndarray` of shape `(g, ALPHABET)`, bool): the tokens each table covers.

    Returns:
        `np.ndarray` of shape `(g, ALPHABET)`, int64: each table's frequencies (0 outside its
        range), identical to :func:`quantized_frequencies` on its covered tokens.
    """
    g, a = qlog.shape
    size = inside.sum(axis=1)
    w = np.where(inside & (qlog != _ABSENT), _POW2_EIGHTHS[qlog & 7] >> np.minimum(qlog >> 3, 62),
                 0)
    total_w = w.sum(axis=1)
    empty = total_w == 0
    w[empty] = inside[empty]
    total_w = np.where(empty, size, total_w)
    scaled = w * (TOTAL - size)[:, None]
    freq = np.where(inside, 1 + scaled // total_w[:, None], 0)
    short = TOTAL - freq.sum(axis=1)
    # Largest remainders first, ties to the lower token: a stable sort of -remainder, with the
    # tokens outside the range pushed to the end.
    key = np.where(inside, -(scaled % total_w[:, None]), np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(a)[None, :].repeat(g, 0), axis=1)
    return freq + (rank < short[:, None])


def _quantize_batch(counts: np.ndarray) -> np.ndarray:
    """:func:`quantize_counts` of every row of ``counts`` (g, A); int64 result."""
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(-8.0 * np.log2(counts / np.maximum(total, 1e-300))), 0, _ABSENT - 1)
    return np.where(counts > 0, q, _ABSENT).astype(np.int64)


def _fit_tables(
    hist: np.ndarray, col_lo: np.ndarray, col_hi: np.ndarray, assign: np.ndarray,
    first: int = 0, reach: int = MAX_TOKEN,
) -> tuple[list[Table], np.ndarray, np.ndarray]:
    """Tables re-estimated from the columns assigned to them (empty groups dropped).

    All tables are fitted at once with array operations; both forms of :func:`table_from_counts`
    (asymmetric over ``lo..hi``, symmetric over ``-m..m``) are fitted and the cheaper kept, with
    the same rule and the same bytes as :func:`table_from_counts`.

    Args:
        hist (`np.ndarray` of shape `(n, A)`, float64): column histograms of the tokens
            ``first - 85 .. first - 85 + A - 1`` (a slice of the alphabet holding every count).
        first (`int`): alphabet index of the slice's first token.
        reach (`int`): largest |token| of any column; the tables are fitted over the tokens
            ``-reach .. reach`` only (not the whole alphabet), which keeps every array small.

    Returns:
        ``(tables, assign, lengths)``, ``lengths`` of shape ``(A, g)``: per-token code lengths
        in bits over the same slice (see :func:`_code_lengths`).
    """
    order = np.argsort(assign, kind="stable")
    ranked = assign[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    remap = np.zeros(int(ranked[-1]) + 1, dtype=np.int64)
    remap[ranked[starts]] = np.arange(starts.size)  # drop empty groups, keep their order
    assign = remap[assign]
    width = hist.shape[1]
    shift = first - (MAX_TOKEN - reach)  # column of the hist slice in the -reach..reach arrays
    pooled = np.zeros((starts.size, 2 * reach + 1))  # (g, 2 reach + 1) pooled histograms
    pooled[:, shift: shift + width] = np.add.reduceat(hist[order], starts, axis=0)
    lo = np.minimum.reduceat(col_lo[order], starts)
    hi = np.maximum.reduceat(col_hi[order], starts)
    tok = np.arange(-reach, reach + 1)
    # asymmetric form
    in_asym = (tok[None, :] >= lo[:, None]) & (tok[None, :] <= hi[:, None])
    q_asym = _quantize_batch(np.where(in_asym, pooled, 0.0))
    f_asym = _frequencies_batch(q_asym, in_asym)
    # symmetric form: p(t) = p(-t) = (c(t) + c(-t)) / 2 for t != 0
    m = np.maximum(-lo, hi)
    in_sym = np.abs(tok)[None, :] <= m[:, None]
    mirrored = 0.5 * (pooled + pooled[:, ::-1])
    mirrored[:, reach] = pooled[:, reach]
    mags = np.where(in_sym & (tok >= 0)[None, :], mirrored, 0.0)  # magnitudes 0..m
    q_mag = _quantize_batch(mags)
    q_sym = np.where(tok[None, :] >= 0, q_mag, q_mag[:, ::-1])
    f_sym = _frequencies_batch(q_sym, in_sym)
    with np.errstate(divide="ignore"):
        len_asym = np.where(in_asym, PRECISION - np.log2(np.maximum(f_asym, 1)), _OUT_OF_RANGE)
        len_sym = np.where(in_sym, PRECISION - np.log2(np.maximum(f_sym, 1)), _OUT_OF_RANGE)
    cost_asym = (pooled * np.where(in_asym, len_asym, 0.0)).sum(1) + 8 * (
        TABLE_HEADER_BYTES + (hi - lo + 1))
    cost_sym = (pooled * np.where(in_sym, len_sym, 0.0)).sum(1) + 8 * (TABLE_HEADER_BYTES + m + 1)
    use_sym = cost_sym < cost_asym  # ties keep the asymmetric form, as min() does
    tables = []
    for i in range(starts.size):
        if use_sym[i]:
            qlog = q_sym[i, reach: reach + m[i] + 1]
            tables.append(Table(-int(m[i]), qlog.astype(np.uint8), symmetric=True))
        else:
            qlog = q_asym[i, lo[i] + reach: hi[i] + reach + 1]
            tables.append(Table(int(lo[i]), qlog.astype(np.uint8)))
    lengths = np.where(use_sym[:, None], len_sym, len_asym).T[shift: shift + width]
    return tables, assign, np.ascontiguousarray(lengths)


def side_info_bits(tables: list[Table], n_columns: int) -> int:
    """Bits of the serialized model: table headers, table bytes and column indices."""
    table_bytes = sum(t.nbytes for t in tables)
    index_bytes = (n_columns * column_bits_per_index(len(tables)) + 7) // 8
    return 8 * (table_bytes + index_bytes)


def fit_model(
    hist: np.ndarray, max_tables: int = MAX_TABLES
) -> tuple[list[Table], np.ndarray, float]:
    """Choose the tables and each column's table by minimising the total size.

    Args:
        hist (`np.ndarray` of shape `(n, ALPHABET)`, int64): token histogram of each column
            (token ``t`` counted at index ``t + 85``).
        max_tables (`int`, *optional*, defaults to 64): largest number of tables tried.

    Returns:
        `tuple`: the tables, the table index of each column (`np.ndarray` of shape `(n,)`,
        int64) and the estimated total size in bits (ideal stream length + side information).
    """
    n = hist.shape[0]
    present = hist > 0
    idx = np.arange(ALPHABET) - MAX_TOKEN
    col_lo = np.where(present, idx, MAX_TOKEN).min(axis=1)
    col_hi = np.where(present, idx, -MAX_TOKEN).max(axis=1)
    # Spread statistic used only to initialise the clustering: mean |token| of the column.
    spread = (hist * np.abs(idx)).sum(axis=1) / np.maximum(hist.sum(axis=1), 1)
    order = np.argsort(spread, kind="stable")
    # Only the tokens that occur matter: the products below run over that slice of the alphabet.
    used = np.flatnonzero(present.any(axis=0))
    first, last = (int(used[0]), int(used[-1])) if used.size else (MAX_TOKEN, MAX_TOKEN)
    histf = hist[:, first: last + 1].astype(np.float64)
    reach = max(MAX_TOKEN - first, last - MAX_TOKEN, 0)
    fit = functools.partial(_fit_tables, histf, col_lo, col_hi, first=first, reach=reach)

    def refine(state: tuple, iterations: int) -> tuple:
        """Lloyd steps: move every column to its cheapest table, refit, until nothing moves."""
        tables, assign, lengths = state
        for _ in range(iterations):
            new = np.argmin(histf @ lengths, axis=1)
            if np.array_equal(new, assign):
                break
            tables, assign, lengths = fit(new)
        return tables, assign, lengths

    def total_bits(state: tuple) -> float:
        tables, assign, lengths = state
        cost = histf @ lengths
        return float(cost[np.arange(n), assign].sum()) + side_info_bits(tables, n)

    # The table count is chosen after _SEARCH_ITERATIONS Lloyd steps per count; only the chosen
    # count gets the full refinement. Measured on synthetic 2-4 bit layers, this gives the same
    # bits per code as refining every count fully (to 0.0001 bit) at about 1.4x the speed; with
    # no step at all, a 3-bit test layer lost 0.01 bit.
    best: tuple | None = None
    best_bits = math.inf
    for g in _CANDIDATE_TABLE_COUNTS:
        if g > min(n, max_tables):
            break
        assign = np.empty(n, dtype=np.int64)
        for i, chunk in enumerate(np.array_split(order, g)):
            assign[chunk] = i
        state = refine(fit(assign), _SEARCH_ITERATIONS)
        bits = total_bits(state)
        if best is not None and bits >= best_bits:
            break
        best, best_bits = state, bits
    assert best is not None  # n >= 1 is guaranteed by the caller
    best = refine(best, _LLOYD_ITERATIONS - _SEARCH_ITERATIONS)
    return best[0], best[1], total_bits(best)


def serialize_model(tables: list[Table], assign: np.ndarray) -> np.ndarray:
    """Bytes of the model: every table (header + bytes), then the packed column indices."""
    from ._bits import pack_bits

    bits = column_bits_per_index(len(tables))
    parts = [t.serialize() for t in tables]
    parts.append(pack_bits(assign, np.full(assign.size, bits, dtype=np.int64)))
    return np.concatenate(parts)


def parse_model(data: np.ndarray, n_tables: int, n_columns: int) -> tuple[list[Table], np.ndarray]:
    """Inverse of :func:`serialize_model`; raises ``ValueError`` on any inconsistency."""
    from ._bits import packed_nbytes, unpack_bits

    tables = []
    pos = 0
    for _ in range(n_tables):
        if pos + TABLE_HEADER_BYTES > data.size:
            raise ValueError("model bytes end inside a table header")
        first, second = int(data[pos]), int(data[pos + 1])
        pos += TABLE_HEADER_BYTES
        if first == _SYMMETRIC_MARK:
            lo, stored, symmetric = -second, second + 1, True
        else:
            lo, stored, symmetric = first - MAX_TOKEN, second + 1, False
        hi = -lo if symmetric else lo + stored - 1
        if lo < -MAX_TOKEN or hi > MAX_TOKEN or pos + stored > data.size:
            raise ValueError("table range outside the token alphabet or past the model bytes")
        tables.append(Table(lo, data[pos: pos + stored].copy(), symmetric=symmetric))
        pos += stored
    bits = column_bits_per_index(n_tables)
    widths = np.full(n_columns, bits, dtype=np.int64)
    if data.size - pos != packed_nbytes(widths):
        raise ValueError("model bytes have the wrong length for the column table indices")
    assign = unpack_bits(data[pos:], widths)
    if assign.size and int(assign.max()) >= n_tables:
        raise ValueError("a column refers to a table that does not exist")
    return tables, assign
