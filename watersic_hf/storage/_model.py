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
_CANDIDATE_TABLE_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_LLOYD_ITERATIONS = 8
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


def _fit_tables(
    hist: np.ndarray, col_lo: np.ndarray, col_hi: np.ndarray, assign: np.ndarray
) -> tuple[list[Table], np.ndarray]:
    """Tables re-estimated from the columns assigned to them (empty groups dropped)."""
    order = np.argsort(assign, kind="stable")
    ranked = assign[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    remap = np.zeros(int(ranked[-1]) + 1, dtype=np.int64)
    remap[ranked[starts]] = np.arange(starts.size)  # drop empty groups, keep their order
    assign = remap[assign]
    g = starts.size
    pooled = np.add.reduceat(hist[order], starts, axis=0)  # (g, ALPHABET) pooled histograms
    lo = np.minimum.reduceat(col_lo[order], starts)
    hi = np.maximum.reduceat(col_hi[order], starts)
    tables = [table_from_counts(pooled[i], int(lo[i]), int(hi[i])) for i in range(g)]
    return tables, assign


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
    histf = hist.astype(np.float64)
    best: tuple[list[Table], np.ndarray, float] | None = None
    for g in _CANDIDATE_TABLE_COUNTS:
        if g > min(n, max_tables):
            break
        assign = np.empty(n, dtype=np.int64)
        for i, chunk in enumerate(np.array_split(order, g)):
            assign[chunk] = i
        tables, assign = _fit_tables(histf, col_lo, col_hi, assign)
        for _ in range(_LLOYD_ITERATIONS):
            cost = histf @ _code_lengths(tables)
            new = np.argmin(cost, axis=1)
            if np.array_equal(new, assign):
                break
            tables, assign = _fit_tables(histf, col_lo, col_hi, new)
        cost = histf @ _code_lengths(tables)
        total = float(cost[np.arange(n), assign].sum()) + side_info_bits(tables, n)
        if best is None or total < best[2]:
            best = (tables, assign, total)
    assert best is not None  # n >= 1 is guaranteed by the caller
    return best


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
