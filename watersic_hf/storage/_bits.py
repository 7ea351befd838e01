"""Variable-width bit packing (LSB first) for the escape payload and the column-table indices.

Values of width ``w <= 30`` bits are laid end to end in a little-endian bit string. Packing and
unpacking are vectorised with NumPy: each value touches at most two 32-bit words, so a value is
split into a low part (bits that land in its first word) and a high part (bits that spill into
the next word). Memory is ``O(len(values))`` whatever the total bit count.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 30


def packed_nbytes(widths: np.ndarray) -> int:
    """Number of bytes :func:`pack_bits` produces for these widths."""
    return (int(np.sum(widths, dtype=np.int64)) + 7) // 8


def pack_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Pack non-negative integers into a little-endian bit string.

    Args:
        values (`np.ndarray` of shape `(m,)`, integer): values, each ``< 2**widths[i]``.
        widths (`np.ndarray` of shape `(m,)`, integer): bit width of each value, 0 to 30.

    Returns:
        `np.ndarray` of shape `(ceil(sum(widths) / 8),)`, uint8.
    """
    widths = np.asarray(widths, dtype=np.int64)
    values = np.asarray(values, dtype=np.uint64)
    nbytes = packed_nbytes(widths)
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    starts = np.cumsum(widths) - widths
    word = starts >> 5
    shift = (starts & 31).astype(np.uint64)
    shifted = values << shift  # < 2**62: a value never crosses more than one word boundary
    low = shifted & np.uint64(0xFFFFFFFF)
    high = shifted >> np.uint64(32)
    nwords = (nbytes + 3) // 4 + 1
    # The bit fields of different values never overlap, so adding them is the same as OR-ing
    # them; every partial sum stays below 2**32 and is therefore exact in float64.
    acc = np.bincount(word, weights=low.astype(np.float64), minlength=nwords)
    acc += np.bincount(word + 1, weights=high.astype(np.float64), minlength=nwords)
    words = acc.astype(np.uint64).astype("<u4")
    return words.view(np.uint8)[:nbytes].copy()


def unpack_bits(data: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
        data (`np.ndarray`, uint8): the packed bytes; must hold exactly
            ``ceil(sum(widths) / 8)`` bytes (checked by the caller).
        widths (`np.ndarray` of shape `(m,)`, integer): bit width of each value, 0 to 30.

    Returns:
        `np.ndarray` of shape `(m,)`, int64.
    """
    widths = np.asarray(widths, dtype=np.int64)
    if widths.size == 0:
        return np.zeros(0, dtype=np.int64)
    nwords = (data.size + 3) // 4 + 2  # room for the "next word" of the last value
    buf = np.zeros(nwords * 4, dtype=np.uint8)
    buf[: data.size] = data
    words = buf.view("<u4").astype(np.uint64)
    starts = np.cumsum(widths) - widths
    word = starts >> 5
    pair = words[word] | (words[word + 1] << np.uint64(32))
    mask = (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)
    return ((pair >> (starts & 31).astype(np.uint64)) & mask).astype(np.int64)
