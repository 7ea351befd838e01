"""Automatic damping: pick each group's damping by its error on held-out calibration windows.

With few calibration tokens per input feature, ``Σ_X̂`` has small eigenvalues in directions the
calibration set barely saw, and the successive-rounding solve pushes the quantization error into
exactly those directions: the in-sample error looks tiny while the error on new text is ten times
larger (issue 12: a 3-bit SmolLM2 ``down_proj`` with 2,048 tokens, in-sample 0.0046, held-out
0.0476 at damp 1e-4, 0.0138 at damp 0.1). The best damping depends on the layer and on the token
count, so it is chosen per group from data:

1. a fixed, evenly spread share of the calibration windows (:func:`holdout_batches`) is held out;
   the group's statistics are accumulated twice, over the kept windows and over the held-out ones;
2. for each candidate damping the group is quantized from the kept statistics (without
   rescalers, on a row subset of each Linear, which is an unbiased sample of the output error
   because it is a sum over rows) and scored by the held-out output error ``E‖W x − Ŵ x̂‖²``
   computed from the held-out second moments (:func:`~.group_quantizer.output_error_parts`);
3. a coarse decade grid (0.01, 0.1, 1) is refined once by half decades around its best point, and
   walks on by half decades while the best point is the edge of what was tried (1e-5 … 10);
4. the group is then quantized for real from the statistics of ALL windows at the chosen damping,
   so no calibration data is lost. The held-out error of the chosen trial is reported per Linear
   (``heldout_rel_err`` in ``config.json``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ...algorithm import redamp, watersic_quantize
from ...algorithm._validate import MAX_BITS
from ...algorithm.search import entropy_target
from .context import BlockContext, LayerStats

logger = logging.getLogger("watersic_hf.integration.calibrate")

__all__ = ["DAMP_GRID", "DampChoice", "choose_damp", "holdout_batches"]

#: Coarse candidates (relative damping, fraction of the mean diagonal of ``Σ_X̂``); the best one
#: is refined by a factor ``10**±0.5``.
DAMP_GRID = (1e-2, 1e-1, 1.0)
#: Bounds of the refined candidates.
DAMP_MIN, DAMP_MAX = 1e-5, 10.0
#: Trials quantize this share of each Linear's rows ...
TRIAL_ROW_FRACTION = 0.125
#: ... but at least this many rows (or all of them).
TRIAL_MIN_ROWS = 64


def holdout_batches(n_batches: int, fraction: float) -> list[int]:
    """Global indices of the held-out batches: ``ceil(fraction · n)`` of them, evenly spread.

    At least one batch is always kept for fitting, so fewer than two batches hold nothing out
    (automatic damping then falls back to the fixed default, see :func:`choose_damp`'s caller).

    Args:
        n_batches (`int`): number of calibration batches (all ranks together).
        fraction (`float`): share to hold out, in [0, 1).
    """
    if n_batches < 2 or fraction <= 0.0:
        return []
    k = min(n_batches - 1, max(1, math.ceil(fraction * n_batches)))
    return sorted({int((i + 0.5) * n_batches / k) for i in range(k)})


@dataclass
class DampChoice:
    """The damping chosen for one group and how it was found.

    Attributes:
        damp (`float`): the chosen relative damping.
        heldout_rel_err (`dict[str, float]`): per Linear (relative to the block), the held-out
            relative output error of the trial at ``damp`` (fitted on the kept windows only).
        trials (`dict[float, float]`): every candidate tried -> held-out error of the group
            (summed over its Linears, relative to their summed output energy).
    """

    damp: float
    heldout_rel_err: dict[str, float] = field(default_factory=dict)
    trials: dict[float, float] = field(default_factory=dict)


class _HeldOutScore:
    """``E‖W x − Ŵ x̂‖²`` on held-out moments for many ``Ŵ`` of one weight (rows ``sub``).

    With ``D = W − Ŵ`` the error is ``tr(D Σ_X̂ Dᵀ) + tr(W S_Δ Wᵀ) + 2⟨W S_×, D⟩`` where
    ``S_Δ = E[(x − x̂)(x − x̂)ᵀ]`` and ``S_× = E[(x − x̂) x̂ᵀ]`` (see
    :func:`~.group_quantizer.output_error_parts`); everything but the first term depends on
    ``W`` only and is computed once, so a candidate costs one ``(rows, n) × (n, n)`` product.
    """

    def __init__(self, weight: torch.Tensor, held: LayerStats) -> None:
        sx = held.sigma_x
        self.dev = sx.device
        self.dt = torch.float32 if self.dev.type == "cpu" else torch.float64
        self.w = weight.to(self.dev, self.dt)
        self.h = (held.sigma_xhat if held.sigma_xhat is not None else sx).to(self.dt)
        self.ref = float(((self.w @ sx.to(self.dt)) * self.w).sum())
        self.const = 0.0
        self.w_cross = None
        sxh, sxxh = held.sigma_xhat, held.sigma_x_xhat
        if sxh is not None and sxxh is not None:
            s_cross = sxxh - sxh
            s_delta = sx - sxxh - s_cross.T
            self.const = float(((self.w @ s_delta.to(self.dt)) * self.w).sum())
            self.w_cross = self.w @ s_cross.to(self.dt)

    def __call__(self, qweight: torch.Tensor) -> float:
        d = self.w - qweight.to(self.dev, self.dt)
        err = float(((d @ self.h) * d).sum()) + self.const
        if self.w_cross is not None:
            err += 2.0 * float((self.w_cross * d).sum())
        return max(err, 0.0)


def _trial_rows(a: int, seed: int, device: torch.device) -> torch.Tensor:
    k = min(a, max(TRIAL_MIN_ROWS, math.ceil(TRIAL_ROW_FRACTION * a)))
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randperm(a, generator=gen)[:k].sort().values.to(device)


def _row_stats(stats: LayerStats, rows: torch.Tensor) -> LayerStats:
    res = stats.sigma_residual
    return LayerStats(stats.sigma_x, stats.sigma_xhat, stats.sigma_x_xhat,
                      None if res is None else res[rows])


def choose_damp(
    quantizer: Any,
    ctx: BlockContext,
    names: tuple[str, ...],
    fit: LayerStats,
    held: LayerStats,
) -> DampChoice:
    """Choose the damping of the group ``names`` of ``ctx.block`` by held-out output error.

    Every trial is charged to a copy of the rate budget (nothing is reported or changed in the
    block). Each Linear is quantized on a fixed row subset with the entropy target of the whole
    layer, so the candidates are compared at the rate they would get.

    Args:
        quantizer (`GroupQuantizer`): its settings (seed, LMMSE, dead threshold), rate budget
            and statistics preparation; the trials call :func:`watersic_quantize` directly.
        ctx (`BlockContext`): the block (its Linears still hold their float weights).
        names (`tuple[str, ...]`): the group's Linears, relative to the block.
        fit (`LayerStats`): statistics of the kept windows.
        held (`LayerStats`): statistics of the held-out windows (no residual term).

    Returns:
        [`DampChoice`].
    """
    weights = {rel: ctx.linears[rel].weight.detach() for rel in names}
    rows = {rel: _trial_rows(w.shape[0], quantizer.cfg.seed, w.device)
            for rel, w in weights.items()}
    scores = {rel: _HeldOutScore(weights[rel][rows[rel]], held) for rel in names}
    # Validated and masked once; each candidate only refactors (algorithm.redamp).
    base = quantizer.prepare(fit, weights[names[0]], damp=DAMP_GRID[0])
    per_layer: dict[float, dict[str, float]] = {}
    trials: dict[float, float] = {}
    # Per Linear: (step c, mean log L_jj) of the first candidate, whose rate was searched.
    anchors: dict[str, tuple[float, float]] = {}
    cfg = quantizer.cfg

    def evaluate(damp: float) -> float:
        key = float(f"{damp:.6g}")
        if key in trials:
            return trials[key]
        rate = quantizer.rate.trial()
        prepared = redamp(base, key)
        log_l = float(prepared.chol.diagonal().log().mean())
        err_sum = ref_sum = 0.0
        rels: dict[str, float] = {}
        for rel in names:
            w = weights[rel]
            a, n = w.shape
            bits, target = rate.target(a, n, prepared.n_dead)
            # The subset must meet the whole layer's entropy target: its row-scale overhead per
            # weight (16/rows) is larger, so ask for the bits that give the same code entropy.
            h = entropy_target(bits, a, n, prepared.n_dead, target)
            sub = rows[rel]
            n_live = n - prepared.n_dead
            sub_bits = min(MAX_BITS, h + 16.0 / n_live + 16.0 / sub.numel())
            # The first candidate searches the step for the rate; the others take the
            # closed-form step scaled by the geometric mean of their Cholesky diagonal (the
            # search's own starting point, algorithm.md 2.2 step 3) and one rounding pass, and
            # their error is brought to the target rate with D ∝ 2^(−2H). Without rescalers:
            # they cost more than the rounding itself, and they refine the scales of whatever
            # damping is chosen rather than favour one.
            step = None
            if rel in anchors:
                step = anchors[rel][0] * math.exp(log_l - anchors[rel][1])
            sub_stats = _row_stats(fit, sub)
            q = watersic_quantize(
                w[sub], sub_stats.sigma_x, sub_bits, sigma_xhat=sub_stats.sigma_xhat,
                sigma_x_xhat=sub_stats.sigma_x_xhat, sigma_residual=sub_stats.sigma_residual,
                step=step, damp=key, lmmse=cfg.lmmse, rescale=False,
                dead_threshold=cfg.dead_threshold, seed=cfg.seed, target="live",
                prepared=prepared,
            )
            if rel not in anchors:
                anchors[rel] = (q.step, log_l)
            rate.charge(q.rate_bits, a, n)  # what the whole layer would cost
            err = scores[rel](q.dequantize()) * 2.0 ** (2.0 * (q.entropy_bits() - h))
            ref = scores[rel].ref
            rels[rel] = err / max(ref, 1e-300)
            err_sum += err
            ref_sum += ref
        per_layer[key] = rels
        trials[key] = err_sum / max(ref_sum, 1e-300)
        return trials[key]

    for damp in DAMP_GRID:
        evaluate(damp)
    best = min(trials, key=lambda d: trials[d])
    for factor in (10 ** -0.5, 10 ** 0.5):
        cand = best * factor
        if DAMP_MIN <= cand <= DAMP_MAX:
            evaluate(cand)
    # A best point at the edge of what was tried walks on by half decades (to the bounds).
    for _ in range(4):
        best = min(trials, key=lambda d: trials[d])
        if best == max(trials) and best * 10 ** 0.5 <= DAMP_MAX:
            evaluate(best * 10 ** 0.5)
        elif best == min(trials) and best * 10 ** -0.5 >= DAMP_MIN:
            evaluate(best * 10 ** -0.5)
        else:
            break
    best = min(trials, key=lambda d: trials[d])
    logger.info(
        "%s %s: damping %.3g chosen on held-out windows (held-out relative error %.4g; tried %s)",
        ctx.name, "/".join(names), best, trials[best],
        ", ".join(f"{d:.3g}: {e:.4g}" for d, e in sorted(trials.items())),
    )
    return DampChoice(damp=best, heldout_rel_err=per_layer[best], trials=trials)
