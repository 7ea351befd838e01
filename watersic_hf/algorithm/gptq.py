"""Standard GPTQ (Frantar et al., arXiv 2210.17323) on a fixed-width symmetric integer grid.

This is the baseline people ship (AutoGPTQ / GPTQModel ``sym=True``): ``bits``-bit signed codes,
one fp16 scale per group of ``group_size`` input columns and row (or one per row), optional
act-order, relative damping ``0.01`` of the mean diagonal, and the blocked "lazy batch" error
feedback with the upper Cholesky factor of the inverse Hessian.

Grid (GPTQ's symmetric convention): ``maxq = 2^b − 1``, ``scale = 2·max|w_group| / maxq`` and
``code = clamp(round(w / scale), −2^(b−1), 2^(b−1) − 1)``, i.e. AutoGPTQ's unsigned
``q = code + 2^(b−1)`` with ``zero = 2^(b−1)``, stored as the signed ``code``. An all-zero group
gets ``scale = 2 / maxq`` (AutoGPTQ's ``xmin = −1, xmax = +1`` rule); its codes are 0.

Groups: column ``j`` (ORIGINAL index) belongs to group ``j // group_size`` whatever the processing
order, so dequantization never needs a ``g_idx`` table. Without act-order each group's scale is
taken from the error-fed weights when the loop reaches the group's first column (AutoGPTQ's
default); with act-order every scale is taken from the original weights before the loop
(AutoGPTQ's ``static_groups=True``), because the columns of a group are then visited at scattered
times.

Storage of the scales: the effective scale of row ``r``, group ``k`` is
``row_scale[r] · group_scale[r, k]`` with ``row_scale[r]`` a power of two (the smallest one not
below the row's largest scale) and ``group_scale`` fp16, so that both are exactly what
:class:`~watersic_hf.nn.WaterSICLinear` stores and the quantization uses the stored value.
Per-channel GPTQ (``group_size`` 0 or −1, or at least the in-features) needs no group tensor:
the scale is the row scale.
"""

from __future__ import annotations

import math

import torch

from . import _validate as V
from ._scales import fp16_balance
from .api import PreparedStatistics, _prepared_for
from .weight import QuantizedWeight

__all__ = ["DEFAULT_DAMP", "DEFAULT_GROUP_SIZE", "check_gptq_bits", "check_group_size",
           "gptq_quantize", "gptq_reference_order"]

#: GPTQ's usual group size (columns per scale).
DEFAULT_GROUP_SIZE = 128
#: GPTQ's ``percdamp``: damping relative to the mean diagonal of the Hessian.
DEFAULT_DAMP = 0.01
#: Columns per lazy-batch block (GPTQ's ``blocksize``).
DEFAULT_BLOCK = 128
GPTQ_MIN_BITS, GPTQ_MAX_BITS = 2, 8
_FP16_MIN_SUBNORMAL = 2.0**-24


def check_gptq_bits(bits: object) -> int:
    """``bits`` as an int in [2, 8], or a ValueError saying what to pass instead."""
    ok = (not isinstance(bits, bool) and isinstance(bits, (int, float))
          and math.isfinite(float(bits)) and float(bits).is_integer()
          and GPTQ_MIN_BITS <= float(bits) <= GPTQ_MAX_BITS)
    if not ok:
        raise ValueError(
            f"bits={bits!r}: standard GPTQ (method='gptq') uses a fixed-width integer grid and "
            f"needs a whole number of bits in [{GPTQ_MIN_BITS}, {GPTQ_MAX_BITS}]; pass e.g. "
            "bits=4, or use method='gptq_entropy' (entropy-coded GPTQ) for fractional rates")
    return int(bits)


def check_group_size(group_size: object) -> int:
    """``group_size`` as an int; 0 and −1 both mean per-channel and are returned as 0."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
        raise ValueError(
            f"group_size={group_size!r} must be a positive int (columns per scale, e.g. 128), "
            "or 0 / -1 for one scale per output channel")
    return max(group_size, 0)


def _grid_scale(wmax: torch.Tensor, maxq: int) -> torch.Tensor:
    """GPTQ's symmetric step ``2·max|w| / maxq``; ``2 / maxq`` for all-zero groups."""
    return torch.where(wmax > 0, wmax, torch.ones_like(wmax)) * (2.0 / maxq)


def _store_group_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``scale`` (shape ``(a, G)``, float64, positive) into a power-of-two row scale and
    fp16-exact group scales in (0, 1].

    Returns:
        ``(row, group)``: float64 tensors of shapes ``(a,)`` and ``(a, G)``; ``row[:, None] ·
        group`` is the effective scale (exact in float32 and float64).
    """
    exp = torch.ceil(torch.log2(scale.amax(dim=1))).clamp(-24, 15)
    row = torch.pow(2.0, exp)
    group = (scale / row[:, None]).clamp(_FP16_MIN_SUBNORMAL, 65504.0)
    # Groups far below their row's largest one would round to 0 in fp16: the clamp above keeps
    # them at the smallest subnormal (their codes then saturate to the grid, still near zero).
    group = group.to(torch.float16).to(torch.float64).clamp_min(_FP16_MIN_SUBNORMAL)
    return row, group


def _blocks(n: int, block_size: int, starts: torch.Tensor | None) -> list[tuple[int, int]]:
    """Lazy-batch blocks ``[i1, i2)`` of ``n`` columns: every ``block_size`` columns, and also at
    each position in ``starts`` (group starts, so a dynamic group's scale is read at a block
    start, where the lazy updates of all earlier columns have been applied)."""
    cuts = set(range(0, n, block_size))
    if starts is not None:
        cuts.update(int(s) for s in starts.tolist())
    edges = sorted(cuts) + [n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def gptq_reference_order(h_diag: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Processing order of the live columns: decreasing ``diag Σ`` (stable) with act-order,
    else the natural order.

    Args:
        h_diag (`torch.Tensor` of shape `(n_live,)`): diagonal of the undamped Hessian.
    """
    if act_order:
        return torch.argsort(h_diag, descending=True, stable=True)
    return torch.arange(h_diag.numel(), device=h_diag.device)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    sigma_x: torch.Tensor,
    bits: int = 4,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    dead_threshold: float = 1e-3,
    block_size: int = DEFAULT_BLOCK,
    prepared: PreparedStatistics | None = None,
) -> QuantizedWeight:
    """Quantize one linear weight with standard GPTQ (see the module docstring for the grid).

    Minimises ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = Σ_X + δI`` column by column: each column is
    rounded to its group's grid and its error, divided by ``U_jj``, is fed into the later columns
    through row ``j`` of ``U = chol((H + δI)⁻¹)ᵀ`` (upper), in blocks of ``block_size`` columns
    whose updates to the rest of the matrix are applied once per block.

    Dead input features (the same median rule as WaterSIC, ``dead_threshold``) get code 0 and
    column scale 0; they take no part in the loop (AutoGPTQ zeroes columns whose ``H_jj = 0``).

    Args:
        weight (`torch.Tensor` of shape `(a, n)`): the weight (any float dtype; fp64 inside).
        sigma_x (`torch.Tensor` of shape `(n, n)`): input second moment ``E[x xᵀ]`` (GPTQ's
            Hessian up to a factor, which does not change the result).
        bits (`int`, *optional*, defaults to 4): code width, a whole number in [2, 8].
        group_size (`int`, *optional*, defaults to 128): input columns per scale; 0 or −1 for one
            scale per output row. A group size of at least ``n`` is per-channel too.
        act_order (`bool`, *optional*, defaults to False): process the columns in order of
            decreasing ``Σ_X`` diagonal (``desc_act``); group scales then come from the original
            weights (``static_groups``), and column ``j`` keeps group ``j // group_size``.
        damp (`float`, *optional*, defaults to 0.01): damping relative to the mean diagonal.
        dead_threshold (`float`, *optional*, defaults to 1e-3): median-rule threshold for dead
            input features.
        block_size (`int`, *optional*, defaults to 128): columns per lazy-batch block.
        prepared (`PreparedStatistics`, *optional*): :func:`prepare_statistics` of ``sigma_x``
            with the same ``damp`` and ``dead_threshold`` (shared by a group of layers).

    Returns:
        [`QuantizedWeight`] with ``method="gptq"``, ``code_bits=bits``, ``row_scale`` (a power of
        two when grouped, the fp16 channel scale when per-channel), ``col_scale`` (1, or a power of
        two, on live columns; 0 on dead ones) and, when grouped, ``group_scale`` of shape
        ``(a, ceil(n / group_size))`` and ``group_size``; ``step`` is the mean effective scale.

    Raises:
        ValueError: ``bits`` not a whole number in [2, 8], a bad ``group_size`` or
            ``block_size``, or the checks of :func:`prepare_statistics`.
    """
    weight = V.check_weight(weight)
    b = check_gptq_bits(bits)
    g = check_group_size(group_size)
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be True or False, got {act_order!r}")
    damp = V.check_positive("damp", damp, allow_zero=True)
    dead_threshold = V.check_fraction("dead_threshold", dead_threshold)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    device = weight.device
    a, n = weight.shape
    prepared = _prepared_for(prepared, sigma_x, None, None, damp=damp,
                             dead_threshold=dead_threshold, n=n, device=device)
    if g >= n:
        g = 0  # one group spanning every column is the per-channel scale
    maxq = 2**b - 1
    lo, hi = -(2 ** (b - 1)), 2 ** (b - 1) - 1

    live_idx = (torch.arange(n, device=device) if prepared.keep is None
                else prepared.keep.nonzero().flatten())
    w = prepared.live(weight.to(torch.float64))  # (a, n_live)
    n_live = w.shape[1]
    # Upper Cholesky factor of (H + δI)⁻¹ in processing order: the inverse of a permuted matrix is
    # the permuted inverse, so the damped factor of `prepared` is inverted once.
    perm = gptq_reference_order(prepared.h.diagonal(), act_order)
    hinv = torch.cholesky_inverse(prepared.chol)[perm][:, perm]
    u = torch.linalg.cholesky(hinv, upper=True)
    del hinv

    # Scales: (a, G) float64, G groups of ORIGINAL column indices; gid[p] = group of the column
    # processed p-th.
    n_groups = 1 if g == 0 else -(-n // g)
    gid = (torch.zeros(n_live, dtype=torch.int64, device=device) if g == 0
           else (live_idx // g)[perm])
    dynamic = g > 0 and not act_order
    row = col = group = None
    scale = torch.empty((a, n_groups), dtype=torch.float64, device=device)
    if g == 0:
        row16, col16, _ = fp16_balance(_grid_scale(w.abs().amax(dim=1), maxq),
                                       torch.ones(n_live, dtype=torch.float64, device=device))
        row, col = row16.to(torch.float64), col16.to(torch.float64)
        scale[:, 0] = row * col[0]  # col16 is one power of two for every live column
    elif not dynamic:
        wmax = torch.zeros((a, n_groups), dtype=torch.float64, device=device)
        wmax.scatter_reduce_(1, (live_idx // g).expand(a, -1), w.abs(), reduce="amax")
        row, group = _store_group_scales(_grid_scale(wmax, maxq))
        scale = row[:, None] * group
    else:
        group = torch.empty((a, n_groups), dtype=torch.float64, device=device)
        row = torch.empty(a, dtype=torch.float64, device=device)

    work = w[:, perm].clone()
    z = torch.zeros((a, n_live), dtype=torch.float64, device=device)
    first = torch.ones(n_live, dtype=torch.bool, device=device)
    first[1:] = gid[1:] != gid[:-1]
    starts = first.nonzero().flatten() if dynamic else None
    row_set = False
    for i1, i2 in _blocks(n_live, block_size, starts):
        if dynamic and bool(first[i1]):
            k = int(gid[i1])
            cols = (gid == k).nonzero().flatten()  # contiguous, all at or after i1
            wmax = work[:, cols].abs().amax(dim=1)
            s = _grid_scale(wmax, maxq)
            if not row_set:
                # The row's power of two is fixed by its first group; later groups are stored
                # relative to it (fp16 covers 2^-24 .. 2^15 around it).
                row = torch.pow(2.0, torch.ceil(torch.log2(s)).clamp(-24, 15))
                row_set = True
            gs = (s / row).clamp(_FP16_MIN_SUBNORMAL, 65504.0).to(torch.float16).to(torch.float64)
            group[:, k] = gs.clamp_min(_FP16_MIN_SUBNORMAL)
            scale[:, k] = row * group[:, k]
        w1 = work[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s = scale[:, int(gid[i1 + i])]
            x = w1[:, i]
            q = torch.clamp(torch.round(x / s), lo, hi)
            z[:, i1 + i] = q
            e = (x - q * s) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        work[:, i2:] -= err1 @ u[i1:i2, i2:]
    del work, u

    codes = torch.zeros((a, n), dtype=torch.int32, device=device)
    z_orig = torch.empty_like(z)
    z_orig[:, perm] = z
    codes[:, live_idx] = z_orig.to(torch.int32)
    col_scale = torch.zeros(n, dtype=torch.float32, device=device)
    col_scale[live_idx] = 1.0 if col is None else col.to(torch.float32)
    # Groups without a live column keep the scale they were given (or 1 when never reached);
    # their codes are all 0, so any finite fp16 value is correct.
    if group is not None and dynamic:
        reached = torch.zeros(n_groups, dtype=torch.bool, device=device)
        reached[gid.unique()] = True
        group[:, ~reached] = 1.0
    used = scale[:, gid.unique()] if n_live else scale
    return QuantizedWeight(
        codes=codes, col_scale=col_scale, row_scale=row.to(torch.float32),
        dead_columns=prepared.dead, step=float(used.mean()), method="gptq",
        target_bits=float(b), target="original",
        group_scale=None if group is None else group.to(torch.float32),
        group_size=g, code_bits=b, act_order=act_order)
