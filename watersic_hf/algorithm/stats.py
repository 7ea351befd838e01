"""Statistics helpers: dead-feature detection, damped Cholesky factor, transformed target.

Conventions (algorithm.md 2.1): ``W`` is (a, n) = (out_features, in_features); ``Σ_X = E[x xᵀ]``,
``Σ_X̂ = E[x̂ x̂ᵀ]`` and ``Σ_XX̂ = E[x x̂ᵀ]`` are (n, n) with the ORIGINAL input on the left, and
``Σ_ΔR = E[(r − r̂) x̂ᵀ]`` is (a, n).
"""

from __future__ import annotations

import logging

import torch

from ._guards import pinv_solve
from ._linalg import matmul_lower

logger = logging.getLogger(__name__)


def find_dead_columns(sigma_x: torch.Tensor, threshold: float = 1e-3) -> torch.Tensor:
    """Input features that carry (almost) no activation energy.

    Feature ``j`` is dead when ``|Σ_X[j, j]| < threshold · median_k |Σ_X[k, k]|`` or
    ``Σ_X[j, j] <= 0`` (algorithm.md 3.2). The median (not the mean) keeps a few huge-variance
    features, common after SiLU gating, from marking everything else as dead. Use the diagonal of
    the UNQUANTIZED model's ``Σ_X``.

    Args:
        sigma_x (`torch.Tensor` of shape `(n, n)` or `(n,)`): second-moment matrix, or its diagonal.
        threshold (`float`, *optional*, defaults to 1e-3): relative threshold.

    Returns:
        `torch.LongTensor` of shape `(n_dead,)`: sorted indices of dead features, on
        ``sigma_x.device``.
    """
    if not isinstance(sigma_x, torch.Tensor) or sigma_x.ndim not in (1, 2):
        raise ValueError("sigma_x must be an (n, n) second-moment matrix or its (n,) diagonal")
    if sigma_x.ndim == 2 and sigma_x.shape[0] != sigma_x.shape[1]:
        raise ValueError(f"sigma_x must be square, got shape {tuple(sigma_x.shape)}")
    if not (0.0 <= float(threshold) < 1.0):
        raise ValueError(f"threshold={threshold} must lie in [0, 1)")
    d = (sigma_x.diagonal() if sigma_x.ndim == 2 else sigma_x).to(torch.float64)
    mag = d.abs()
    # torch.median returns the lower middle element; average the two middle ones instead so the
    # rule is the textbook median for even n.
    srt = mag.sort().values
    m = srt.numel()
    median = 0.5 * (srt[(m - 1) // 2] + srt[m // 2])
    dead = (mag < threshold * median) | (d <= 0) | ~torch.isfinite(d)
    return dead.nonzero().flatten().to(torch.int64)


def live_mask(n: int, dead: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean mask of shape (n,) that is False at the dead indices."""
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[dead.to(device)] = False
    return mask


def damped_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``h + δ I`` with ``δ = damp · mean(diag h)``, in float64.

    If the factorisation fails (a singular ``h`` with ``damp = 0``, or round-off on a nearly
    singular one), the damping is raised tenfold until it succeeds; this is logged, because it
    changes the objective slightly.

    Args:
        h (`torch.Tensor` of shape `(n, n)`, float64): symmetric PSD matrix (``Σ_X̂``).
        damp (`float`): relative damping ``δ_rel``.

    Returns:
        `tuple[torch.Tensor, float]`: ``L`` (n, n) float64 lower-triangular with positive
        diagonal, and the absolute damping ``δ`` actually used.
    """
    mean_diag = float(h.diagonal().mean())
    if mean_diag <= 0:
        raise ValueError("sigma_xhat has a non-positive mean diagonal; it is not a second-moment "
                         "matrix of the live features")
    rel = float(damp)
    # No identity matrix: one copy of h with δ added to its diagonal is bit-identical to h + δI
    # (off-diagonal entries get + 0.0) and saves two (n, n) float64 temporaries.
    # The factorisation then runs in place in that copy (LAPACK's potrf is in place), so the peak
    # is h plus one (n, n) matrix.
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    for _ in range(12):
        delta = rel * mean_diag
        damped = h.clone(memory_format=torch.contiguous_format)
        damped.diagonal().add_(delta)
        chol, info = torch.linalg.cholesky_ex(damped, out=(damped, info))
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            if rel != damp:
                logger.warning("Cholesky failed at damp=%g; used damp=%g instead", damp, rel)
            return chol, delta
        rel = max(rel * 10.0, 1e-8)
    raise ValueError("could not factor the (damped) second-moment matrix even with damp="
                     f"{rel / 10:g}; check the statistics for corruption")


def transformed_target(
    w: torch.Tensor,
    chol: torch.Tensor,
    delta: float,
    sigma_x_xhat: torch.Tensor | None = None,
    sigma_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ZSIC target ``Y`` with ``‖Y − Ŵ L‖_F² = damped objective + const``.

    Plain mode (no cross statistics): ``Y = W L``. Drift-aware mode (Qronos / residual
    compensation): ``B = W (Σ_XX̂ + δ I) + Σ_ΔR`` and ``Y = B L^{-T}`` (one triangular solve).

    Why ``W Σ_XX̂`` and not ``W Σ_XX̂ᵀ``: the cross term of ``E‖W x − Ŵ x̂‖²`` is
    ``E[x̂ᵀ Ŵᵀ W x] = tr(Ŵ E[x̂ xᵀ] Wᵀ) = tr(Ŵ (W E[x x̂ᵀ])ᵀ)``, so with ``Σ_XX̂ = E[x x̂ᵀ]`` the
    (a, n) matrix that pairs with ``Ŵ`` is ``W Σ_XX̂ = E[(W x) x̂ᵀ]``, the same shape and
    orientation as ``Σ_ΔR = E[(r − r̂) x̂ᵀ]``.

    Args:
        w (`torch.Tensor` of shape `(a, n)`, float64): live columns of the weight.
        chol (`torch.Tensor` of shape `(n, n)`, float64): ``L = chol(Σ_X̂ + δ I)``.
        delta (`float`): absolute damping used in ``chol``.
        sigma_x_xhat (`torch.Tensor` of shape `(n, n)`, float64, *optional*): ``E[x x̂ᵀ]``.
        sigma_residual (`torch.Tensor` of shape `(a, n)`, float64, *optional*): ``E[(r − r̂) x̂ᵀ]``.

    Returns:
        `torch.Tensor` of shape `(a, n)`, float64.
    """
    if sigma_x_xhat is None and sigma_residual is None:
        return matmul_lower(w, chol)
    if sigma_x_xhat is None:
        # Only a residual term: the cross statistics default to Σ_X̂ itself, and
        # W (Σ_X̂ + δI) L^{-T} = W L, so Y = W L + Σ_ΔR L^{-T}.
        b = sigma_residual
        y_extra = _right_solve_lt(chol, b)
        return matmul_lower(w, chol) + y_extra
    # In place in the product (the same additions in the same order): one (a, n) temporary less.
    b = w @ sigma_x_xhat
    b += delta * w
    if sigma_residual is not None:
        b += sigma_residual
    # Solve Y Lᵀ = B, i.e. right-multiply by L^{-T}.
    return _right_solve_lt(chol, b)


def _right_solve_lt(chol: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Y`` with ``Y Lᵀ = B`` (shapes (a, n), (n, n) lower); pseudo-inverse if that overflows.

    ``L`` comes from a successful Cholesky factorisation, so its diagonal is positive, but with
    ``damp=0`` on a nearly singular ``Σ_X̂`` it can be so small that the substitution overflows.
    Then ``Y = B (Lᵀ)⁺`` (minimum norm) is used instead, with a warning.
    """
    y = torch.linalg.solve_triangular(chol.T, b, upper=True, left=False)
    if bool(torch.isfinite(y).all()):
        return y
    logger.warning("the triangular solve for the transformed target overflowed (Cholesky diagonal "
                   "down to %.3g); using the pseudo-inverse instead. Raise damp to avoid this",
                   float(chol.diagonal().min()))
    return pinv_solve(chol.T, b.T).T
