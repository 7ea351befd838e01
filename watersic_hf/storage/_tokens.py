"""Map int32 codes to a small token alphabet plus raw "escape" bits, and back.

Codes with ``|z| <= DIRECT_MAX`` (31) are their own token. Larger magnitudes are split like a
floating-point number: ``k = floor(log2 |z|)`` (5..31) and the bit just below the leading one,
``h``, select the magnitude token ``32 + 2 (k - 5) + h`` (32..85); the remaining ``k - 1`` low
bits are stored raw in a separate bit string. The sign is part of the token, so the alphabet is
``-85..85`` (171 symbols) and covers every int32, including ``-2**31``.

Raw bits are nearly uniform for the smooth, wide distributions that produce escapes (outlier
columns), so coding them raw costs little; the two leading bits, where the distribution still
varies, are entropy coded through the token.
"""

from __future__ import annotations

import numpy as np

_FIRST_OCTAVE = 5  # codes below 2**5 are their own token
DIRECT_MAX = (1 << _FIRST_OCTAVE) - 1  # 31
MAX_TOKEN = DIRECT_MAX + 1 + 2 * (31 - _FIRST_OCTAVE) + 1  # 85
ALPHABET = 2 * MAX_TOKEN + 1  # tokens -85..85, shifted by MAX_TOKEN to 0..170 for counting


def tokenize(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``codes`` and the flat indices of the escapes.

    Args:
        codes (`np.ndarray`, int32): any shape.

    Returns:
        `tuple`: tokens (`np.ndarray`, int16, same shape as ``codes``) and the flat (row-major)
        indices of the entries with ``|z| > DIRECT_MAX`` (`np.ndarray`, int64, increasing).
    """
    flat = codes.reshape(-1)
    tokens = flat.astype(np.int16)  # exact wherever |z| <= 31; escapes are overwritten below
    big = np.flatnonzero((flat > DIRECT_MAX) | (flat < -DIRECT_MAX))
    if big.size:
        tokens[big] = escape_split(flat[big])[0]
    return tokens.reshape(codes.shape), big


def escape_split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split codes with ``|z| > DIRECT_MAX`` into (token, raw bits, raw width).

    Args:
        values (`np.ndarray` of shape `(m,)`, integer): codes with ``|z| >= 32``.

    Returns:
        `tuple` of three `np.ndarray` of shape `(m,)`: tokens (int16), raw values (int64) and
        their widths in bits (int64, 4..30).
    """
    v = values.astype(np.int64)
    mag = np.abs(v)
    # frexp is exact for integers below 2**53: mag = m * 2**e with m in [0.5, 1).
    k = np.frexp(mag.astype(np.float64))[1].astype(np.int64) - 1
    width = k - 1
    h = (mag >> width) & 1
    raw = mag & ((np.int64(1) << width) - 1)
    token = (DIRECT_MAX + 1 + 2 * (k - _FIRST_OCTAVE) + h) * np.sign(v)
    return token.astype(np.int16), raw, width


def escape_widths(tokens: np.ndarray) -> np.ndarray:
    """Raw-bit widths of escape tokens (``|token| >= 32``), int64."""
    m = np.abs(tokens.astype(np.int64)) - (DIRECT_MAX + 1)
    return (m >> 1) + _FIRST_OCTAVE - 1


def escape_join(tokens: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`escape_split`: codes (int64) from escape tokens and raw bits."""
    t = tokens.astype(np.int64)
    m = np.abs(t) - (DIRECT_MAX + 1)
    k = (m >> 1) + _FIRST_OCTAVE
    mag = (np.int64(1) << k) | ((m & 1) << (k - 1)) | raw
    return np.where(t < 0, -mag, mag)
