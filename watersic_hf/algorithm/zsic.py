"""The ZSIC loop (zero-forcing successive interference cancellation), blocked and reference.

Both functions quantize the transformed target ``Y = W L`` (or its drift-aware form) column by
column from the LAST column to the first. Column ``i`` is rounded with a step ``s_i`` in the
``Y`` domain; its reconstruction ``ŵ_i = γ_i · α_i · z_i`` with ``α_i = s_i / L_ii`` is then
subtracted, through row ``i`` of ``L``, from the columns not yet quantized. After the loop the
residual equals ``Y − Ŵ L``.

* WaterSIC: ``s_i = c`` for every column (so ``α_i = c / L_ii``).
* GPTQ without clipping (reversed column order): ``s_i = Δ · L_ii`` (so ``α_i = Δ``).

``γ_i`` is the per-column LMMSE gain ``⟨z, r⟩ / (s_i ‖z‖²)`` (the best scalar fit of ``s_i z`` to
the current residual column ``r``), or 1 when LMMSE is off; it is 0 for an all-zero column.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Columns per block in :func:`zsic`. 128 keeps the in-block residual slice (128 × a) small
#: enough to stay in cache for a ≤ 8192 while the prefix update is a large GEMM.
DEFAULT_BLOCK = 128


@contextlib.contextmanager
def _serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the per-column part of the loop with one intra-op thread on CPU.

    Each column's work is a handful of small vector operations. With several OpenMP/BLAS
    threads, every one of them ends in a barrier, and when the cores are shared with other
    processes a barrier waits for a descheduled thread: measured on 2 busy cores, a 4096×4096
    ZSIC took 42 s with 2 threads and 5 s with the per-column part serial. The big GEMM updates
    between blocks still use every thread. (``torch.set_num_threads`` is process-wide; it is
    restored on exit.)
    """
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@torch.no_grad()
def zsic(
    y: torch.Tensor,
    chol: torch.Tensor,
    steps: torch.Tensor,
    *,
    lmmse: bool = True,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked ZSIC ("lazy batch" updates), mathematically identical to :func:`zsic_reference`.

    Columns are processed in blocks of ``block_size`` from the end. Inside a block each column
    updates only the not-yet-quantized columns of the same block (a rank-1 update on a slice of
    at most ``block_size`` rows of the transposed residual); when the block is done its whole
    correction is applied to the remaining prefix with one GEMM,
    ``R[:, :b0] −= (Z γ α)_blk · L[blk, :b0]``. The residual is kept transposed, (n, a), so that
    one column of ``Y`` is one contiguous row in memory.

    Args:
        y (`torch.Tensor` of shape `(a, n)`): transformed target; its dtype (float32 in the rate
            search, float64 for the final pass) is the working precision.
        chol (`torch.Tensor` of shape `(n, n)`): lower Cholesky factor ``L`` (positive diagonal).
        steps (`torch.Tensor` of shape `(n,)`): step ``s_i`` of each column in the ``Y`` domain.
        lmmse (`bool`, *optional*, defaults to True): compute LMMSE gains (else ``γ ≡ 1``).
        block_size (`int`, *optional*, defaults to 128): columns per block.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: integer-valued codes ``Z`` of shape `(a, n)` in
        ``y.dtype`` (exact for |z| < 2^24 in float32) and gains ``γ`` of shape `(n,)`.
    """
    a, n = y.shape
    dtype = y.dtype
    chol = chol.to(dtype)
    steps = steps.to(dtype)
    alpha = steps / chol.diagonal()
    # Per-column scalars as Python numbers (one host transfer, not one per column). They hold
    # the exact `dtype` values, so r / s rounds exactly as the 0-d tensor division of the
    # reference loop.
    steps_l, alpha_l = steps.tolist(), alpha.tolist()
    tiny = torch.finfo(dtype).tiny
    # (n, a) residual, row i = column i. Always a fresh copy: for a == 1, y.T.contiguous() would
    # alias y and the loop would overwrite the caller's target.
    res_t = torch.empty((n, a), dtype=dtype, device=y.device)
    res_t.copy_(y.T)
    codes_t = torch.empty_like(res_t)
    upd_t = torch.empty_like(res_t)  # row i = γ_i α_i z_i, the reconstruction of column i
    gains: list[torch.Tensor] = []
    block_size = max(1, int(block_size))
    b1 = n
    while b1 > 0:
        b0 = max(0, b1 - block_size)
        with _serial_on_cpu(y.device):
            for i in range(b1 - 1, b0 - 1, -1):
                r, z, u = res_t[i], codes_t[i], upd_t[i]
                torch.div(r, steps_l[i], out=z)
                z.round_()  # round half to even, as the reference does
                if lmmse:
                    # γ = ⟨z, r⟩ / (s ‖z‖²); an all-zero column gives 0 / tiny = 0.
                    g = torch.dot(z, r) / (torch.dot(z, z) * steps_l[i]).clamp_min_(tiny)
                    gains.append(g)
                    torch.mul(z, g * alpha_l[i], out=u)
                else:
                    torch.mul(z, alpha_l[i], out=u)
                # Cancel this column from the block's not-yet-quantized columns (and column i
                # itself, so the final residual is Y − Ŵ L).
                res_t[b0 : i + 1].addcmul_(chol[i, b0 : i + 1, None], u[None, :], value=-1.0)
        if b0 > 0:
            # Lazy batch: the whole block's correction to the prefix in one GEMM.
            res_t[:b0].addmm_(chol[b0:b1, :b0].T, upd_t[b0:b1], alpha=-1.0)
        b1 = b0
    if lmmse:
        gamma = torch.stack(gains[::-1])  # gains were collected from column n-1 down to 0
    else:
        gamma = torch.ones(n, dtype=dtype, device=y.device)
    return codes_t.T, gamma


@torch.no_grad()
def zsic_reference(
    y: torch.Tensor,
    chol: torch.Tensor,
    steps: torch.Tensor,
    *,
    lmmse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain column-by-column ZSIC loop; the test oracle for :func:`zsic`.

    Same arguments and returns as :func:`zsic` (without ``block_size``). Written as directly as
    possible from algorithm.md 2.2: for ``i = n−1 … 0``: ``z = round(R[:, i] / s_i)``,
    ``R[:, :i+1] −= γ_i α_i z L[i, :i+1]``.
    """
    a, n = y.shape
    dtype = y.dtype
    chol = chol.to(dtype)
    steps = steps.to(dtype)
    res = y.clone()
    codes = torch.zeros_like(res)
    gamma = torch.ones(n, dtype=dtype, device=y.device)
    for i in range(n - 1, -1, -1):
        r = res[:, i].clone()
        z = torch.round(r / steps[i])
        codes[:, i] = z
        zz = float(z @ z)
        if lmmse:
            gamma[i] = float(z @ r) / (float(steps[i]) * zz) if zz > 0 else 0.0
        alpha_i = steps[i] / chol[i, i]
        # In-place rank-1 update of the prefix (no a×i temporary).
        res[:, : i + 1].addr_(gamma[i] * alpha_i * z, chol[i, : i + 1], alpha=-1.0)
    return codes, gamma
