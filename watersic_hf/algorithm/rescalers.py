"""Diagonal row/column rescalers fitted after ZSIC (algorithm.md 3.7).

With the codes fixed, ``Ŵ = diag(t) · Ŵ0 · diag(Γ)`` (``Ŵ0 = Z diag(α)``) is fitted to the
drift-aware objective

``J(t, Γ) = (1/(a n)) [tr(W Σ_X Wᵀ) − 2 tr(M Cᵀ) + tr(M Σ_X̂ Mᵀ)]``, ``M = diag(t) Ŵ0 diag(Γ)``,
``C = W Σ_XX̂ + Σ_ΔR``

by alternating exact minimisation over Γ (an n×n ridge solve) and over t (closed form per row),
in float64: at high rates J is a small difference of large terms and float32 loses it.

Safeguards, as in the official ``find_optimal_rescalers3``: adaptive ridges
``1e-8 · mean|diag|`` (without the official absolute floor of 1e-11, see ``_RIDGE_FLOOR``); a
Γ step that raises J is backtracked (fractions 1/2 … 1/16) or reverted, which ends the fit; Γ is
clipped to [−0.1, 1.5]; after each iteration t is normalised to mean|t| = 1 (the scale moves into
Γ, the product is unchanged); stop when the relative decrease of J is below 3e-4 or after 1000
iterations. One deliberate tightening: ANY iteration that ends with a higher J (the official code
only checks iterations without clipping) is reverted and ends the fit, so the returned loss
sequence is non-increasing by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._guards import pinv_solve
from ._linalg import gram, matmul_lower

GAMMA_CLIP = (-0.1, 1.5)
LINE_SEARCH = (0.5, 0.25, 0.125, 0.0625)
#: The official ridge is max(1e-11, 1e-8·mean|diag|). The absolute 1e-11 floor breaks scale
#: equivariance (a layer with weights ~1e-7 has F3 ~ 1e-14 and would get its Γ shrunk), so the
#: floor here only guards against an exactly zero matrix.
_RIDGE_FLOOR = 1e-300


@dataclass
class RescalerResult:
    """Output of :func:`fit_rescalers`.

    Attributes:
        t (`torch.Tensor` of shape `(a,)`, float64): row gains, mean|t| = 1 (unless all zero).
        gamma (`torch.Tensor` of shape `(n,)`, float64): column gains Γ.
        losses (`list[float]`): J at the start and after every accepted iteration.
        iterations (`int`): iterations run (accepted or not).
    """

    t: torch.Tensor
    gamma: torch.Tensor
    losses: list[float] = field(default_factory=list)
    iterations: int = 0


def _ridge(values: torch.Tensor) -> float:
    return max(_RIDGE_FLOOR, 1e-8 * float(values.abs().mean()))


def _normalise(t: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = float(t.abs().mean())
    if s > 0 and s != 1.0:
        return t / s, g * s
    return t, g


@torch.no_grad()
def rescaler_loss(
    w0: torch.Tensor,
    t: torch.Tensor,
    g: torch.Tensor,
    sigma_xhat: torch.Tensor,
    cross: torch.Tensor,
    const: float,
) -> float:
    """J(t, Γ) evaluated directly (two GEMM-sized products); used for checks, not in the loop."""
    a, n = w0.shape
    m = t[:, None] * w0 * g[None, :]
    return (const - 2.0 * float((m * cross).sum()) + float(((m @ sigma_xhat) * m).sum())) / (a * n)


def _spd_solve(mat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``mat x = rhs`` for a symmetric PSD-plus-ridge ``mat`` (Cholesky, else LU, else pinv).

    The ridge makes ``mat`` positive definite in exact arithmetic, but round-off on a (nearly)
    singular ``F3`` (duplicated input features, all-zero code columns) can still make Cholesky
    fail and LU divide by ~0; the pseudo-inverse then gives the minimum-norm solution.
    """
    # Factor in a copy that becomes the factor (potrf is in place): one (n, n) temporary, not two.
    work = mat.clone(memory_format=torch.contiguous_format)
    info = torch.zeros((), dtype=torch.int32, device=mat.device)
    chol, info = torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) == 0:
        x = torch.cholesky_solve(rhs[:, None], chol).squeeze(1)
        if bool(torch.isfinite(x).all()):
            return x
    del work, chol
    x, info = torch.linalg.solve_ex(mat, rhs)
    if int(info) == 0 and bool(torch.isfinite(x).all()):
        return x
    return pinv_solve(mat, rhs, hermitian=True)


@torch.no_grad()
def fit_rescalers(
    w0: torch.Tensor,
    sigma_xhat: torch.Tensor,
    cross: torch.Tensor,
    const: float,
    gamma_init: torch.Tensor,
    *,
    chol: torch.Tensor | None = None,
    delta: float = 0.0,
    tol: float = 3e-4,
    max_iter: int = 1000,
) -> RescalerResult:
    """Fit row gains ``t`` and column gains ``Γ`` by alternating minimisation.

    Cost per iteration: one Gram matrix (``Ŵ0ᵀ diag(t²) Ŵ0``), one ``(a, n) @ (n, n)`` product
    for the row quadratic forms, one n×n Cholesky solve; both products exploit symmetry or
    triangularity (about 56% of a plain GEMM each). The initial J comes from the first Γ-step's
    quadratic form, so it costs nothing. From the second iteration on, a Γ-step that lowers J by
    less than ``tol`` (relative) ends the fit without the t-step: with Γ (nearly) unchanged, t is
    already (nearly) optimal, and this saves one product on the last iteration.

    Args:
        w0 (`torch.Tensor` of shape `(a, n)`, float64): ``Z · diag(α)``.
        sigma_xhat (`torch.Tensor` of shape `(n, n)`, float64): ``Σ_X̂`` (undamped).
        cross (`torch.Tensor` of shape `(a, n)`, float64): ``C = W Σ_XX̂ + Σ_ΔR``.
        const (`float`): ``tr(W Σ_X Wᵀ)`` (only shifts J; used for the relative tolerance).
        gamma_init (`torch.Tensor` of shape `(n,)`): starting Γ (the LMMSE gains).
        chol (`torch.Tensor` of shape `(n, n)`, float64, *optional*): lower factor with
            ``Σ_X̂ + δ I = L Lᵀ``; when given, ``(M Σ_X̂ Mᵀ)_rr = ‖(M L)_r‖² − δ ‖M_r‖²`` is used
            (a triangular product instead of a full one).
        delta (`float`, *optional*, defaults to 0.0): the ``δ`` of ``chol``.
        tol (`float`, *optional*, defaults to 3e-4): relative-decrease stopping tolerance.
        max_iter (`int`, *optional*, defaults to 1000): iteration cap.

    Returns:
        [`RescalerResult`].
    """
    a, n = w0.shape
    scale = float(a * n)

    def row_quad(m: torch.Tensor) -> torch.Tensor:
        if chol is None:
            return ((m @ sigma_xhat) * m).sum(1)
        ml = matmul_lower(m, chol)
        return (ml * ml).sum(1) - delta * (m * m).sum(1)

    t = torch.ones(a, dtype=torch.float64, device=w0.device)
    g = gamma_init.to(torch.float64).clone()
    loss = float("nan")
    losses: list[float] = []
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        t_prev, g_prev, loss_prev = t, g, loss
        # Γ-step: J(Γ) = (const − 2 Γ·f4 + Γᵀ F3 Γ)/(a n), F3 = Σ_X̂ ∘ (Ŵ0ᵀ diag(t²) Ŵ0).
        wt = t[:, None] * w0
        # In place in the Gram matrix (the product is commutative, so the bits are those of
        # sigma_xhat * gram): one (n, n) matrix instead of two.
        f3 = gram(wt).mul_(sigma_xhat)
        f4 = (wt * cross).sum(0)

        def q(gv: torch.Tensor, f3=f3, f4=f4) -> float:
            return (const - 2.0 * float(gv @ f4) + float(gv @ (f3 @ gv))) / scale

        if iterations == 1:
            loss = loss_prev = q(g)
            losses.append(loss)
        # The ridge goes onto f3's diagonal for the solve and is taken off again by restoring
        # the saved diagonal (exact), so no ridged (n, n) copy is needed.
        diag = f3.diagonal().clone()
        f3.diagonal().add_(_ridge(diag))
        try:
            g_new = _spd_solve(f3, f4)
        finally:
            f3.diagonal().copy_(diag)
        if q(g_new) > loss:
            for frac in LINE_SEARCH:
                cand = g + frac * (g_new - g)
                if q(cand) <= loss:
                    g_new = cand
                    break
            else:
                break  # no Γ step lowers J: keep the previous iterate and stop
        g_new = g_new.clamp(*GAMMA_CLIP)
        loss_g = q(g_new)
        if iterations > 1 and loss_prev - loss_g < tol * max(abs(loss_prev), 1e-300):
            if loss_g <= loss_prev:
                g, loss = g_new, loss_g
                losses.append(loss)
            break
        g = g_new
        # t-step: J(t) = (const − 2 Σ t_r f7_r + Σ t_r² f8_r)/(a n), exact per row.
        m = w0 * g[None, :]
        f7 = (cross * m).sum(1)
        f8 = row_quad(m)
        den = f8 + _ridge(f8)
        # f8_r = M_r Σ_X̂ M_rᵀ ≥ 0 for a PSD Σ_X̂; a non-positive denominator (round-off, or an
        # indefinite user Σ_X̂) has no minimiser in t_r, so that row keeps its previous gain.
        t = torch.where(den > 0, f7 / den.clamp_min(_RIDGE_FLOOR), t)
        loss = (const - 2.0 * float(t @ f7) + float((t * t) @ f8)) / scale
        t, g = _normalise(t, g)
        if loss > loss_prev:
            t, g, loss = t_prev, g_prev, loss_prev
            break
        losses.append(loss)
        if loss_prev - loss < tol * max(abs(loss_prev), 1e-300):
            break
    return RescalerResult(t=t, gamma=g, losses=losses, iterations=iterations)
