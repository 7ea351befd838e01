"""Single-stream ANS through ``constriction`` (coder ``"ans"``), for small and mid-size matrices.

The columns that share a table are coded together: for table ``g`` (in table order) the tokens
of its columns, in increasing column order and row-major inside that block (``a × n_g``), form
one run of i.i.d. symbols; all runs go into ONE ``constriction.stream.stack.AnsCoder`` (so the
stream pays one final state, ~64 bits, in all). Decoding is one ``decode(model, count)`` call per
table (constriction's Rust loop) and one column permutation back to the original order, so its
speed does not depend on the matrix size; the lockstep rANS of ``_rans`` is faster only on
large matrices (measured crossover ≈ 4 M codes, see docs/format.md).

The models are constriction ``Categorical(p, perfect=False)`` with ``p = f / 4096`` from our
integer tables, so the decoder rebuilds exactly the encoder's models. Tables with one token
cost nothing and are skipped. Stream bytes: constriction's uint32 words, little-endian.
"""

from __future__ import annotations

import numpy as np

from ._model import Table


def _model(table: Table):
    import constriction

    p = table.freq.astype(np.float64) / float(table.freq.sum())
    return constriction.stream.model.Categorical(p, perfect=False)


def _groups(assign: np.ndarray, n_tables: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns ordered by table (stable) and the number of columns of each table."""
    return np.argsort(assign, kind="stable"), np.bincount(assign, minlength=n_tables)


def encode(tokens: np.ndarray, column_table: np.ndarray, tables: list[Table]) -> np.ndarray:
    """ANS-encode a token matrix ``(a, n)`` (int16); returns the stream bytes (uint8)."""
    import constriction

    a, _ = tokens.shape
    order, counts = _groups(column_table, len(tables))
    ends = np.cumsum(counts)
    coder = constriction.stream.stack.AnsCoder()
    # A stack: encode the last table first so that the decoder meets table 0 first.
    for g in range(len(tables) - 1, -1, -1):
        t = tables[g]
        if t.size == 1 or counts[g] == 0:
            continue
        cols = order[ends[g] - counts[g]: ends[g]]
        symbols = (tokens[:, cols].astype(np.int32) - t.lo).reshape(-1)
        coder.encode_reverse(symbols, _model(t))
    return coder.get_compressed().astype("<u4").view(np.uint8)


def decode(
    stream: np.ndarray, shape: tuple[int, int], column_table: np.ndarray, tables: list[Table]
) -> np.ndarray:
    """Decode :func:`encode`'s stream; returns the tokens, row-major, int32 ``(a * n,)``.

    Raises:
        ValueError: the stream length is not whole words, constriction rejects it, or words
            are left over after the last code.
    """
    import constriction

    a, n = shape
    if stream.size % 4:
        raise ValueError("ANS stream length is not a whole number of 32-bit words")
    order, counts = _groups(column_table, len(tables))
    permuted = np.empty((a, n), dtype=np.int32)
    words = stream.view("<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        start = 0
        for g, t in enumerate(tables):
            c = int(counts[g])
            if c == 0:
                continue
            if t.size == 1:
                permuted[:, start: start + c] = t.lo
            else:
                block = coder.decode(_model(t), a * c)
                block += t.lo
                permuted[:, start: start + c] = block.reshape(a, c)
            start += c
        leftover = not coder.is_empty()
    except (ValueError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: B036 - a Rust panic surfaces as pyo3's PanicException
        # (a BaseException); report malformed input as the ValueError callers expect.
        raise ValueError(f"ANS stream rejected by constriction: {err!r}") from err
    if leftover:
        raise ValueError("ANS stream has data left after the last code (corrupted?)")
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    return np.take(permuted, inverse, axis=1).reshape(-1)
