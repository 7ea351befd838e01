"""Storage precision of the per-row and per-column scales (both stored as fp16).

``α_j = c / L_jj`` spans many decades on real activations, so the column scales alone may not fit
fp16's normal range [2^-14, 65504]. Only the products ``row_r · col_j`` matter, so a power of two
``2^k`` can be moved from the columns to the rows exactly; :func:`fp16_balance` picks ``k`` to
put both vectors inside the normal range (``k = 0`` when they already fit) and then rounds them to
fp16. The codes never change.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
LOG2_MIN_NORMAL = -14.0
LOG2_MAX = math.log2(FP16_MAX)


def _log2_range(v: torch.Tensor) -> tuple[float, float] | None:
    mag = v.abs()
    mag = mag[mag > 0]
    if mag.numel() == 0:
        return None
    lg = torch.log2(mag.to(torch.float64))
    return float(lg.min()), float(lg.max())


def fp16_balance(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Move a power of two between ``row`` and ``col`` and round both to fp16 values.

    Args:
        row (`torch.Tensor` of shape `(a,)`): per-row scale (any float dtype).
        col (`torch.Tensor` of shape `(n,)`): per-column scale.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, int]`: ``row · 2^k`` and ``col · 2^{−k}`` as float32
        tensors holding exactly fp16-representable values, and ``k``.
    """
    rr, cr = _log2_range(row), _log2_range(col)
    k = 0
    if rr is not None and cr is not None:
        # Need row·2^k and col·2^-k inside [2^-14, 65504]:
        #   k ≥ max(cmax − LOG2_MAX, −14 − rmin),  k ≤ min(cmin + 14, LOG2_MAX − rmax).
        lo = max(cr[1] - LOG2_MAX, LOG2_MIN_NORMAL - rr[0])
        hi = min(cr[0] - LOG2_MIN_NORMAL, LOG2_MAX - rr[1])
        if math.ceil(lo) <= math.floor(hi):
            # Move nothing when both already fit (e.g. GPTQ keeps row_scale = 1), else the least.
            k = min(max(0, math.ceil(lo)), math.floor(hi))
        else:
            k = int(math.floor(0.5 * (lo + hi) + 0.5))
            logger.warning(
                "scales span more than fp16's range (rows 2^[%.1f, %.1f], columns 2^[%.1f, %.1f]);"
                " some will be clamped to 65504 or become subnormal", rr[0], rr[1], cr[0], cr[1])
    elif cr is not None:
        # All rows zero: keep the columns centred in the normal range.
        k = int(round(0.5 * (cr[0] + cr[1]) - 0.5 * (LOG2_MIN_NORMAL + LOG2_MAX)))
    # Multiplying by a power of two is exact in float64 (no overflow at these magnitudes).
    row_s = row.to(torch.float64) * (2.0**k)
    col_s = col.to(torch.float64) * (2.0**-k)
    row16 = row_s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    col16 = col_s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    return row16, col16, k
