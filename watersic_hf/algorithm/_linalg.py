"""GEMMs that exploit structure: A @ L with L lower-triangular, and the Gram matrix Aᵀ A.

torch exposes neither BLAS ``trmm`` nor ``syrk``, so both are done in column chunks: chunk ``j``
of ``A @ L`` only needs the rows of ``L`` at and below the chunk's first row, and the Gram matrix
only needs its upper block triangle. With 8 chunks this is ~56% of a full GEMM's flops while
each piece is still a large, efficient GEMM. Results equal the plain products up to
floating-point summation order.
"""

from __future__ import annotations

import torch

#: Chunks per product; below MIN_CHUNK columns per chunk the plain product is used.
CHUNKS = 8
MIN_CHUNK = 256


def _bounds(n: int) -> list[tuple[int, int]]:
    k = max(1, min(CHUNKS, n // MIN_CHUNK))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def matmul_lower(a: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``a @ lower`` for a lower-triangular ``lower``.

    Args:
        a (`torch.Tensor` of shape `(m, n)`).
        lower (`torch.Tensor` of shape `(n, n)`): lower-triangular (the strict upper part is
            ignored, i.e. treated as zero).

    Returns:
        `torch.Tensor` of shape `(m, n)`.
    """
    n = lower.shape[0]
    bounds = _bounds(n)
    if len(bounds) == 1:
        return a @ torch.tril(lower)
    out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    for j0, j1 in bounds:
        # Column block [j0, j1) of L is zero above row j0; only its diagonal block needs tril.
        blk = lower[j0:, j0:j1].clone()
        blk[: j1 - j0] = torch.tril(blk[: j1 - j0])
        torch.mm(a[:, j0:], blk, out=out[:, j0:j1])
    return out


def gram(a: torch.Tensor) -> torch.Tensor:
    """``aᵀ a`` computed from its upper block triangle.

    Args:
        a (`torch.Tensor` of shape `(m, n)`).

    Returns:
        `torch.Tensor` of shape `(n, n)`, exactly symmetric.
    """
    n = a.shape[1]
    bounds = _bounds(n)
    if len(bounds) == 1:
        g = a.T @ a
        return 0.5 * (g + g.T)
    out = torch.empty((n, n), dtype=a.dtype, device=a.device)
    for i0, i1 in bounds:
        rows = a[:, i0:i1].T @ a[:, i0:]  # (i1-i0, n-i0): blocks (i, j >= i)
        out[i0:i1, i0:] = rows
        out[i1:, i0:i1] = rows[:, i1 - i0 :].T
    # Diagonal blocks came from one product each; symmetrise them exactly.
    for i0, i1 in bounds:
        d = out[i0:i1, i0:i1]
        out[i0:i1, i0:i1] = 0.5 * (d + d.T)
    return out


def matmul_upper(a: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``a @ upper`` for an upper-triangular ``upper`` (e.g. ``Lᵀ``).

    Args:
        a (`torch.Tensor` of shape `(m, n)`).
        upper (`torch.Tensor` of shape `(n, n)`): upper-triangular (strict lower part ignored).

    Returns:
        `torch.Tensor` of shape `(m, n)`.
    """
    n = upper.shape[0]
    bounds = _bounds(n)
    if len(bounds) == 1:
        return a @ torch.triu(upper)
    out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    for j0, j1 in bounds:
        # Column block [j0, j1) of U is zero below row j1; only its diagonal block needs triu.
        blk = upper[:j1, j0:j1].clone()
        blk[j0:] = torch.triu(blk[j0:])
        torch.mm(a[:, :j1], blk, out=out[:, j0:j1])
    return out
