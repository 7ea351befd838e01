"""Rate search: the closed-form nominal-rate → step map and the secant search on it.

The step is parametrised by a *nominal rate* ρ (algorithm.md 2.2 steps 3 and 5):

* WaterSIC: ``c(ρ) = 2^{−ρ} · √12 · GM_j(√s_j · L_jj)``,
* GPTQ / RTN (one common step): ``Δ(ρ) = 2^{−ρ} · √12 · GM_j(√s_j)``,

with ``s_j`` the second moment of weight column ``j``. ρ is the exact rate for uniformly
distributed weights; for Gaussian weights at high rate the per-column entropy is ρ + 0.2546, so
ρ ≈ H* is an excellent starting point and the entropy is close to linear in ρ with slope 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

SQRT12 = math.sqrt(12.0)
#: Clamp for the nominal rate. The official code clamps to [−10, 10]; the upper end is raised so
#: that targets up to 16 bits per weight remain reachable (ρ ≈ H* − 0.25 at high rate).
RHO_MIN, RHO_MAX = -16.0, 24.0


def geometric_mean(values: torch.Tensor) -> float:
    """Geometric mean of the strictly positive entries (1.0 if there are none).

    Zero entries (all-zero weight columns) are skipped: they would drive the mean to 0 and the
    step to 0, while such columns cost no bits whatever the step.
    """
    pos = values[values > 0]
    if pos.numel() == 0:
        return 1.0
    return float(torch.exp(torch.log(pos.to(torch.float64)).mean()))


def step_for_rate(rho: float, scale: float) -> float:
    """``2^{−ρ} · √12 · scale``: the step for nominal rate ``rho`` (``scale`` = the GM term)."""
    return 2.0 ** (-rho) * SQRT12 * scale


def secant_search(
    evaluate: Callable[[float], float],
    target: float,
    *,
    rho0: float | None = None,
    max_evals: int = 6,
    tol: float = 0.005,
) -> tuple[float, float, list[tuple[float, float]]]:
    """Find ρ with ``evaluate(ρ) ≈ target`` by a Newton step of slope 1, then secant steps.

    Follows algorithm.md 2.2 step 5: ρ0 = target, ρ1 = ρ0 − (H0 − H*), then secant updates,
    each clamped to [RHO_MIN, RHO_MAX], stopping once ``|H − H*| < tol`` or after ``max_evals``
    evaluations. The entropy is a step function of ρ at very low rates and noisy at small sizes,
    so when the last two points give a flat or decreasing slope the slope-1 step is used instead
    of dividing by ~0 (a guard the official code lacks).

    Args:
        evaluate (`Callable[[float], float]`): ρ ↦ entropy (bits).
        target (`float`): target entropy H*.
        rho0 (`float`, *optional*): first ρ (defaults to ``target``).
        max_evals (`int`, *optional*, defaults to 6): evaluation budget.
        tol (`float`, *optional*, defaults to 0.005): stop when within this many bits.

    Returns:
        `tuple[float, float, list[tuple[float, float]]]`: best ρ, its entropy, and every
        evaluated ``(ρ, H)`` pair in order.
    """

    def clamp(r: float) -> float:
        return min(max(r, RHO_MIN), RHO_MAX)

    history: list[tuple[float, float]] = []
    rho = clamp(target if rho0 is None else rho0)
    h = evaluate(rho)
    history.append((rho, h))
    prev: tuple[float, float] | None = None
    while abs(h - target) >= tol and len(history) < max_evals:
        if prev is None:
            new = rho - (h - target)
        else:
            d_rho, d_h = rho - prev[0], h - prev[1]
            slope = d_h / d_rho if abs(d_rho) > 1e-10 else 0.0
            if abs(d_h) < 1e-10 and abs(d_rho) < 1e-10:
                break
            # H increases with ρ; a non-positive or absurd secant slope is noise, use slope 1.
            if not (0.05 < slope < 20.0):
                slope = 1.0
            new = rho - (h - target) / slope
        new = clamp(new)
        if abs(new - rho) < 1e-10:
            break
        prev = (rho, h)
        rho = new
        h = evaluate(rho)
        history.append((rho, h))
    best_rho, best_h = min(history, key=lambda p: abs(p[1] - target))
    logger.debug("rate search: target %.4f, %d evaluations, best H=%.4f at rho=%.4f",
                 target, len(history), best_h, best_rho)
    return best_rho, best_h, history


def max_entropy_bits(a: int, n_live: int) -> float:
    """The largest pooled entropy the codes of an ``a × n_live`` layer can have: ``log2(a·n_live)``.

    A plug-in entropy over ``a·n_live`` codes is at most the log of the number of distinct values,
    and there are at most ``a·n_live`` of them (every code different). A target above this is
    unreachable: the rate search would only drive the step towards zero.
    """
    count = int(a) * int(n_live)
    if count < 1:
        raise ValueError(f"a layer needs at least one live weight, got a={a}, n_live={n_live}")
    return math.log2(count)


def max_live_rate_bits(a: int, n_live: int) -> float:
    """The largest useful rate per LIVE weight of an ``a × n_live`` layer (``target="live"``).

    ``max_entropy_bits`` plus the side information charged on top of the codes (one fp16 scale per
    row and per live column), i.e. the inverse of :func:`entropy_target`'s ``"live"`` formula.
    The cross-layer rate controller clips its per-layer targets to this.
    """
    return max_entropy_bits(a, n_live) + 16.0 / n_live + 16.0 / a


def entropy_target(
    bits: float, a: int, n_orig: int, n_dead: int, target: str, *, min_entropy: float = 0.01
) -> float:
    """Entropy target H* for the codes of the live columns (algorithm.md 2.2 step 4).

    ``target="live"``: ``H* = bits − 16/n_live − 16/a`` (the cross-layer rate controller has
    already taken the dead columns out of its budget). ``target="original"``: the rate per
    ORIGINAL entry, ``[H*·a·n_live + 16a + 16 n_live + 16 n_dead] / (a n_orig)``, must equal
    ``bits``, i.e. ``H* = bits·n_orig/n_live − 16/n_live − 16/a − 16 n_dead/(a n_live)``; the two
    agree when nothing is dead. A target at or below the side-information cost is raised to
    ``min_entropy`` (with a warning): the layer then gets almost all-zero codes. A target above
    :func:`max_entropy_bits` (a small layer asked for many bits) is capped there, with a warning.
    """
    n_live = n_orig - n_dead
    if target == "live":
        h = bits - 16.0 / n_live - 16.0 / a
    else:
        h = bits * n_orig / n_live - 16.0 / n_live - 16.0 / a - 16.0 * n_dead / (a * n_live)
    if h < min_entropy:
        logger.warning("bits=%.4g leaves %.4g bits for the codes of a %dx%d layer after side "
                       "information; using an entropy target of %.3g", bits, h, a, n_orig,
                       min_entropy)
        h = min_entropy
    cap = max_entropy_bits(a, n_live)
    if h > cap:
        logger.warning("bits=%.4g asks for a code entropy of %.4g bits in a %dx%d layer (%d live "
                       "columns), but %d codes carry at most log2(%d) = %.4g bits; capping the "
                       "entropy target at %.4g", bits, h, a, n_orig, n_live, a * n_live,
                       a * n_live, cap, cap)
        h = cap
    return h
