"""Storage precision of the per-row and per-column scales (both stored as fp16).

``α_j = c / L_jj`` spans many decades on real activations, so the column scales alone may not fit
fp16's normal range [2^-14, 65504]. Only the products ``row_r · col_j`` matter, so a power of two
``2^k`` can be moved from the columns to the rows exactly; :func:`fp16_balance` picks ``k`` to
put both vectors inside the normal range (``k = 0`` when they already fit) and then rounds them to
fp16.

When no ``k`` fits every scale, the scales whose whole row or column is *negligible* (its largest
dequantized entry is below fp16's resolution, 2^-11, of the layer's largest entry) are left out of
the choice of ``k`` and, if they would land below 2^-14, are stored as exactly 0 instead of as a
subnormal: a subnormal keeps only a few significant bits, some kernels flush it to zero anyway,
and such a row or column cannot be seen next to the rest of the layer. If even the remaining
scales do not fit, ``k`` is chosen so that nothing overflows (clamping to 65504 would be a large
error on the layer's biggest weights) and the smallest scales are stored as subnormals, with a
warning. The codes never change here; ``zero_codes_of_zero_scales`` makes the codes of a flushed
row or column 0 so that the stored tensors stay consistent.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
LOG2_MIN_NORMAL = -14.0
LOG2_MAX = math.log2(FP16_MAX)
#: Relative resolution of fp16 (half a unit in the last place of 1.0): a contribution below this
#: fraction of the layer's largest entry disappears when added to it in fp16.
FP16_RESOLUTION = 2.0**-11


def _log2_range(v: torch.Tensor) -> tuple[float, float] | None:
    mag = v.abs()
    mag = mag[mag > 0]
    if mag.numel() == 0:
        return None
    lg = torch.log2(mag.to(torch.float64))
    return float(lg.min()), float(lg.max())


def _least_move(rr: tuple[float, float], cr: tuple[float, float]) -> int | None:
    """The ``k`` nearest 0 that puts ``row·2^k`` and ``col·2^-k`` in the normal range, or None."""
    # Need row·2^k and col·2^-k inside [2^-14, 65504]:
    #   k ≥ max(cmax − LOG2_MAX, −14 − rmin),  k ≤ min(cmin + 14, LOG2_MAX − rmax).
    lo = max(cr[1] - LOG2_MAX, LOG2_MIN_NORMAL - rr[0])
    hi = min(cr[0] - LOG2_MIN_NORMAL, LOG2_MAX - rr[1])
    if math.ceil(lo) <= math.floor(hi):
        # Move nothing when both already fit (e.g. GPTQ keeps row_scale = 1), else the least.
        return min(max(0, math.ceil(lo)), math.floor(hi))
    return None


def _negligible(
    row: torch.Tensor, col: torch.Tensor, codes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the rows / columns whose largest dequantized entry is below fp16 resolution.

    Args:
        row (`torch.Tensor` of shape `(a,)`), col (`torch.Tensor` of shape `(n,)`): scales.
        codes (`torch.Tensor` of shape `(a, n)`, *optional*): the integer codes; without them a
            row's largest entry is bounded by ``|row_r| · max|col|`` (codes of magnitude 1).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: boolean masks of shape `(a,)` and `(n,)`.
    """
    r = row.abs().to(torch.float64)
    c = col.abs().to(torch.float64)
    if codes is None:
        row_contrib = r * c.max()
        col_contrib = c * r.max()
    else:
        ent = r[:, None] * codes.abs().to(torch.float64) * c[None, :]
        row_contrib = ent.amax(1)
        col_contrib = ent.amax(0)
        del ent
    top = max(float(row_contrib.max()), float(col_contrib.max()))
    return row_contrib < FP16_RESOLUTION * top, col_contrib < FP16_RESOLUTION * top


def fp16_balance(
    row: torch.Tensor, col: torch.Tensor, codes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Move a power of two between ``row`` and ``col`` and round both to fp16 values.

    Every returned scale is 0 or an fp16 normal number unless the non-negligible scales alone span
    more than fp16's range (then the smallest are subnormal and a warning is logged).

    Args:
        row (`torch.Tensor` of shape `(a,)`): per-row scale (any float dtype).
        col (`torch.Tensor` of shape `(n,)`): per-column scale.
        codes (`torch.Tensor` of shape `(a, n)`, *optional*): the codes these scales multiply;
            only read when the scales do not fit, to tell negligible rows/columns apart.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, int]`: ``row · 2^k`` and ``col · 2^{−k}`` as float32
        tensors holding exactly fp16-representable values (negligible ones that would be
        subnormal set to 0), and ``k``.
    """
    rr, cr = _log2_range(row), _log2_range(col)
    k = 0
    flush_row = flush_col = None
    if rr is not None and cr is not None:
        fit = _least_move(rr, cr)
        if fit is not None:
            k = fit
        else:
            flush_row, flush_col = _negligible(row, col, codes)
            rr_keep = _log2_range(row[~flush_row])
            cr_keep = _log2_range(col[~flush_col])
            fit = None if rr_keep is None or cr_keep is None else _least_move(rr_keep, cr_keep)
            if fit is not None:
                k = fit
            else:
                rr_keep = rr_keep or rr
                cr_keep = cr_keep or cr
                # Centre the live scales, but inside the range where nothing overflows.
                lo = max(cr_keep[1] - LOG2_MAX, LOG2_MIN_NORMAL - rr_keep[0])
                hi = min(cr_keep[0] - LOG2_MIN_NORMAL, LOG2_MAX - rr_keep[1])
                k = int(math.floor(0.5 * (lo + hi) + 0.5))
                k_min, k_max = math.ceil(cr_keep[1] - LOG2_MAX), math.floor(LOG2_MAX - rr_keep[1])
                if k_min <= k_max:
                    k = min(max(k, k_min), k_max)
                logger.warning(
                    "scales span more than fp16's range (rows 2^[%.1f, %.1f], columns "
                    "2^[%.1f, %.1f], negligible ones left out); the smallest are stored as fp16 "
                    "subnormals%s", rr_keep[0], rr_keep[1], cr_keep[0], cr_keep[1],
                    "" if k_min <= k_max else " and the largest clamped to 65504")
    elif cr is not None:
        # All rows zero: keep the columns centred in the normal range.
        k = int(round(0.5 * (cr[0] + cr[1]) - 0.5 * (LOG2_MIN_NORMAL + LOG2_MAX)))
    # Multiplying by a power of two is exact in float64 (no overflow at these magnitudes).
    row_s = row.to(torch.float64) * (2.0**k)
    col_s = col.to(torch.float64) * (2.0**-k)
    if flush_row is not None:
        tiny = 2.0**LOG2_MIN_NORMAL
        drop_r = flush_row & (row_s.abs() < tiny)
        drop_c = flush_col & (col_s.abs() < tiny)
        n_r, n_c = int(drop_r.sum()), int(drop_c.sum())
        if n_r or n_c:
            logger.info("fp16 scales: %d negligible row(s) and %d negligible column(s) would be "
                        "subnormal; stored as 0", n_r, n_c)
            row_s = row_s.masked_fill(drop_r, 0.0)
            col_s = col_s.masked_fill(drop_c, 0.0)
    row16 = row_s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    col16 = col_s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    return row16, col16, k


def zero_codes_of_zero_scales(
    codes: torch.Tensor, row16: torch.Tensor, col16: torch.Tensor
) -> torch.Tensor:
    """``codes`` with the rows and columns whose stored scale is 0 set to 0.

    Such entries dequantize to 0 whatever the code, so this changes no weight; it only keeps a
    flushed row or column from carrying (and being charged for) codes nobody can read.

    Args:
        codes (`torch.Tensor` of shape `(a, n)`): integer-valued codes.
        row16 (`torch.Tensor` of shape `(a,)`), col16 (`torch.Tensor` of shape `(n,)`): scales.

    Returns:
        `torch.Tensor` of shape `(a, n)`: ``codes`` itself when no scale is 0, else a copy.
    """
    zr, zc = row16 == 0, col16 == 0
    if not (bool(zr.any()) or bool(zc.any())):
        return codes
    keep = (~zr)[:, None] & (~zc)[None, :]
    return codes * keep.to(codes.dtype)
