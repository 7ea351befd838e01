"""Information-theoretic reference curves (Gaussian weight model, algorithm.md 1.2-1.4).

Reverse waterfilling over independent Gaussian components with variances ``v_k`` (for a layer:
``v_k = σ_W² λ_k``, ``λ_k`` the eigenvalues of ``Σ_X``), in bits per entry:

``D(θ) = mean_k min(θ, v_k)``, ``R(θ) = mean_k max(0, ½ log2(v_k / θ))``.
"""

from __future__ import annotations

import math

import torch

#: 2πe/12: high-rate distortion ratio of entropy-coded scalar rounding to the Gaussian R(D).
SCALAR_LOSS = 2.0 * math.pi * math.e / 12.0
#: ½ log2(2πe/12) ≈ 0.2546 bit: the same loss as a rate gap.
SCALAR_GAP_BITS = 0.5 * math.log2(SCALAR_LOSS)


def _variances(v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ValueError("variances must be a non-empty vector of finite positive numbers")
    return v


def _distortion(theta: float, v: torch.Tensor) -> float:
    return float(torch.clamp(v, max=theta).mean())


def _rate(theta: float, v: torch.Tensor) -> float:
    return float(torch.clamp(0.5 * torch.log2(v / theta), min=0.0).mean())


def reverse_waterfilling_rate(distortion: float, variances: torch.Tensor) -> float:
    """``R_IT(D)`` in bits per entry for the given component variances.

    Args:
        distortion (`float`): per-entry MSE ``D`` (> 0).
        variances (`torch.Tensor` of shape `(n,)`): component variances ``v_k`` (> 0).

    Returns:
        `float`: the minimum rate; 0 when ``D ≥ mean(v)``.
    """
    v = _variances(variances)
    if not distortion > 0:
        raise ValueError(f"distortion={distortion} must be > 0")
    if distortion >= float(v.mean()):
        return 0.0
    # D(θ) is increasing in θ and D(θ) ≤ θ, so the water level lies in [D, max v]; bisect in
    # log space (θ may be many decades below max v).
    lo, hi = math.log(distortion), math.log(float(v.max()))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _distortion(math.exp(mid), v) < distortion:
            lo = mid
        else:
            hi = mid
    return _rate(math.exp(0.5 * (lo + hi)), v)


def reverse_waterfilling_distortion(rate: float, variances: torch.Tensor) -> float:
    """``D_IT(R)``: the minimum per-entry MSE at ``rate`` bits per entry.

    Args:
        rate (`float`): bits per entry (≥ 0).
        variances (`torch.Tensor` of shape `(n,)`): component variances ``v_k`` (> 0).
    """
    v = _variances(variances)
    if not rate >= 0:
        raise ValueError(f"rate={rate} must be >= 0")
    if rate == 0:
        return float(v.mean())
    # R(θ) is decreasing in θ; R(min v · 2^{-2R}) ≥ R and R(max v) = 0 bracket the level.
    hi = math.log(float(v.max()))
    lo = math.log(float(v.min())) - 2.0 * rate * math.log(2.0) - 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _rate(math.exp(mid), v) > rate:
            lo = mid
        else:
            hi = mid
    return _distortion(math.exp(0.5 * (lo + hi)), v)
