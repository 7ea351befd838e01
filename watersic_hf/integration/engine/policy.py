"""Statistics policies: how a group's paired batches become the statistics it is quantized with.

One interface, two implementations:

* :class:`FixedMixPolicy` — the paper's default: ``Σ_X̂``, and with drift ``Σ_X`` and ``Σ_XX̂``,
  each token weighted by ``(1 − ε_a)·p + ε_a`` when the group is attention-weighted; plus
  ``Σ_ΔR`` for the residual-writing Linears. One quantization per Linear.
* :class:`AdaptiveEpsPolicy` — the adaptive (ε_q, ε_a) search (algorithm.md §3.6): keeps the
  unweighted and the attention-weighted moments separately, quantizes the group at blends of them
  and keeps the blend whose quantized block reproduces the float input of the next group best.

Both accumulate fp32 per-batch products into fp64 sums (:class:`MomentAccumulator`) and are
dropped as soon as their group is quantized, which frees the sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..stats import MomentAccumulator
from .context import BlockContext, GroupStep, LayerStats
from .damping import DampChoice, choose_damp
from .group_quantizer import GroupQuantizer
from .runner import PairedBatch, PairedRunner

logger = logging.getLogger("watersic_hf.integration.calibrate")

__all__ = ["AdaptiveEpsPolicy", "FixedMixPolicy", "StatisticsPolicy", "golden_section",
           "make_policy", "search_eps"]


class StatisticsPolicy(Protocol):
    """Collects a group's statistics batch by batch, then quantizes the group."""

    def add(self, batch: PairedBatch) -> None:
        """Accumulate one paired batch."""

    def solve(self, quantizer: GroupQuantizer, runner: PairedRunner) -> dict[str, Any]:
        """Quantize every Linear of the group (final weights written); returns the results."""

    def accumulators(self) -> list[MomentAccumulator]:
        """The moment sums :meth:`add` feeds, in a fixed order (a distributed run reduces them)."""


def make_policy(step: GroupStep, ctx: BlockContext, config: Any) -> StatisticsPolicy:
    """The policy for ``step``: adaptive-ε search when the plan asks for it, else the fixed mix."""
    if step.adaptive:
        return AdaptiveEpsPolicy(step, ctx, config)
    return FixedMixPolicy(step, ctx, config)


class _MixMoments:
    """The fixed-mix moment sums of one set of windows: ``Σ_X̂`` and, with drift, ``Σ_X`` and
    ``Σ_XX̂``; each token weighted by ``(1 − ε_a)·p + ε_a`` when ``p`` is given."""

    def __init__(self, n: int, device: torch.device, drift: bool, eps: float) -> None:
        self.eps = eps
        self.xhat = MomentAccumulator(n, n, device)
        self.x = MomentAccumulator(n, n, device) if drift else None
        self.cross = MomentAccumulator(n, n, device) if drift else None

    def add(self, batch: PairedBatch) -> None:
        w = None if batch.p is None else (1.0 - self.eps) * batch.p + self.eps
        self.xhat.add(batch.x_hat, weight=w)
        if self.x is not None and self.cross is not None:
            self.x.add(batch.x, weight=w)
            self.cross.add(batch.x, batch.x_hat, weight=w)

    @property
    def tokens(self) -> int:
        return self.xhat.tokens

    def accumulators(self) -> list[MomentAccumulator]:
        return [a for a in (self.xhat, self.x, self.cross) if a is not None]

    def take(self) -> LayerStats:
        """Normalised (and for ``Σ_X``, ``Σ_X̂`` symmetrised) in place in the sums.

        ``Σ_X`` and ``Σ_X̂`` are made exactly symmetric here, which is what the quantizer's
        validation would do in a copy; so it takes them as they are and no second ``(n, n)``
        fp64 matrix is made.
        """
        if self.x is not None and self.cross is not None:
            return LayerStats(
                self.x.take(symmetrize=True), self.xhat.take(symmetrize=True), self.cross.take()
            )
        return LayerStats(self.xhat.take(symmetrize=True))


def _pool_(fit: LayerStats, held: LayerStats, n_fit: int, n_held: int) -> LayerStats:
    """``fit`` becomes the token-weighted mean of ``fit`` and ``held`` (in place): the statistics
    of all windows, for the final quantization after the damping was chosen."""
    a = n_fit / (n_fit + n_held)
    for name in ("sigma_x", "sigma_xhat", "sigma_x_xhat"):
        f, h = getattr(fit, name), getattr(held, name)
        if f is not None and h is not None:
            f.mul_(a).add_(h, alpha=1.0 - a)
    return fit


class FixedMixPolicy:
    """Fixed attention mix ``ε_a = attn_eps`` and full drift correction (the paper's default).

    With automatic damping (``config.auto_damp``) the batches of ``ctx.held_out`` go to a second
    set of sums; the group's damping is chosen by their output error
    (:func:`~.damping.choose_damp`) and the group is then quantized from all windows.
    """

    def __init__(self, step: GroupStep, ctx: BlockContext, config: Any) -> None:
        self.step, self.ctx = step, ctx
        n = ctx.linears[step.first].in_features
        dev = ctx.device
        self.drift = ctx.fcache is not None and config.drift
        self.fit = _MixMoments(n, dev, self.drift, config.attn_eps)
        self.held = (_MixMoments(n, dev, self.drift, config.attn_eps)
                     if getattr(config, "auto_damp", False) and ctx.held_out else None)
        self.res = (
            MomentAccumulator(ctx.linears[step.first].out_features, n, dev)
            if step.residual is not None
            else None
        )

    def add(self, batch: PairedBatch) -> None:
        if self.held is not None and batch.index in self.ctx.held_out:
            self.held.add(batch)
        else:
            self.fit.add(batch)
        if self.res is not None and batch.dr is not None:
            # All windows: the residual term is a target shift, not scored on held-out data.
            self.res.add(batch.dr, batch.x_hat)

    def accumulators(self) -> list[MomentAccumulator]:
        accs = self.fit.accumulators() + ([] if self.held is None else self.held.accumulators())
        return accs + ([self.res] if self.res is not None else [])

    def stats(self) -> LayerStats:
        """The group's statistics over the kept windows (all windows without a held-out set)."""
        stats = self.fit.take()
        if self.res is not None and self.res.tokens:
            stats.sigma_residual = self.res.take()
        return stats

    def solve(self, quantizer: GroupQuantizer, runner: PairedRunner) -> dict[str, Any]:
        if self.held is None or self.held.tokens == 0 or self.fit.tokens == 0:
            return quantizer.quantize_group(self.ctx, self.step.names, self.stats())
        n_fit, n_held = self.fit.tokens, self.held.tokens
        fit = self.stats()
        held = self.held.take()
        self.held = None
        choice = choose_damp(quantizer, self.ctx, self.step.names, fit, held)
        stats = _pool_(fit, held, n_fit, n_held)
        del held
        return quantizer.quantize_group(self.ctx, self.step.names, stats, choice)


class AdaptiveEpsPolicy:
    """Per-block search of the drift blend ε_q and the attention blend ε_a (golden section).

    The search is kept cheap: each trial quantizes the group without rescalers (they only refine
    the scales of the chosen point, which is re-quantized with them), and its error is measured
    on the held-out batches (``ctx.held_out``) only, which also keeps the choice honest; without
    held-out batches every batch is used. With automatic damping the group's damping is chosen
    first, at the fixed mix, and every trial reuses it.
    """

    _KINDS = ("x", "xhat", "cross", "wx", "wxhat", "wcross")

    def __init__(self, step: GroupStep, ctx: BlockContext, config: Any) -> None:
        if step.next_first is None:
            raise ValueError(f"the adaptive-eps search of {step.first} needs a next group")
        self.step, self.ctx = step, ctx
        self.steps = config.adaptive_eps_steps
        self.eps = config.attn_eps
        n = ctx.linears[step.first].in_features
        self.acc = {k: MomentAccumulator(n, n, ctx.device) for k in self._KINDS}
        # The held-out batches at the fixed mix, for automatic damping (also in ``acc``).
        self.held = (_MixMoments(n, ctx.device, True, config.attn_eps)
                     if getattr(config, "auto_damp", False) and ctx.held_out else None)

    def add(self, batch: PairedBatch) -> None:
        acc = self.acc
        acc["x"].add(batch.x)
        acc["xhat"].add(batch.x_hat)
        acc["cross"].add(batch.x, batch.x_hat)
        if batch.p is not None:
            acc["wx"].add(batch.x, weight=batch.p)
            acc["wxhat"].add(batch.x_hat, weight=batch.p)
            acc["wcross"].add(batch.x, batch.x_hat, weight=batch.p)
        if self.held is not None and batch.index in self.ctx.held_out:
            self.held.add(batch)

    def accumulators(self) -> list[MomentAccumulator]:
        accs = [self.acc[k] for k in self._KINDS]
        return accs + ([] if self.held is None else self.held.accumulators())

    def _damping(self, quantizer: GroupQuantizer, mixed: Callable[[float, float], LayerStats],
                 n_all: int) -> DampChoice | None:
        """Automatic damping at the fixed mix: the kept windows' statistics are all windows'
        minus the held-out ones (token-weighted)."""
        if self.held is None or not 0 < self.held.tokens < n_all:
            return None
        n_held = self.held.tokens
        held = self.held.take()
        self.held = None
        fit = mixed(0.0, self.eps)
        for name in ("sigma_x", "sigma_xhat", "sigma_x_xhat"):
            f, h = getattr(fit, name), getattr(held, name)
            f.mul_(n_all / (n_all - n_held)).sub_(h, alpha=n_held / (n_all - n_held))
        fit.sigma_x = 0.5 * (fit.sigma_x + fit.sigma_x.T)
        fit.sigma_xhat = 0.5 * (fit.sigma_xhat + fit.sigma_xhat.T)
        return choose_damp(quantizer, self.ctx, self.step.names, fit, held)

    def solve(self, quantizer: GroupQuantizer, runner: PairedRunner) -> dict[str, Any]:
        step, ctx = self.step, self.ctx
        nxt = step.next_first
        assert nxt is not None
        n_all = self.acc["x"].tokens
        # Not symmetrised here: the blends below are symmetrised by the quantizer's validation,
        # exactly as before the engine split (symmetrising first would round differently).
        m = {k: a.take() for k, a in self.acc.items() if a.tokens > 0}
        self.acc.clear()
        if "wx" not in m:  # the probe did not fire: fall back to unweighted statistics
            m.update(wx=m["x"], wxhat=m["xhat"], wcross=m["cross"])
        originals = {rel: ctx.linears[rel].weight.detach().clone() for rel in step.names}
        search = sorted(ctx.held_out) or None
        ref_energy = runner.input_energy(nxt, search)

        def mixed(eq: float, ea: float) -> LayerStats:
            def blend(kind: str) -> torch.Tensor:
                fam = {}
                for pre in ("w", ""):
                    x = m[pre + "x"]
                    fam[pre] = x if kind == "x" else (1 - eq) * m[pre + kind] + eq * x
                return (1 - ea) * fam["w"] + ea * fam[""]

            return LayerStats(blend("x"), blend("xhat"), blend("cross"))

        choice = self._damping(quantizer, mixed, n_all)
        damp = None if choice is None else choice.damp
        evaluated: dict[tuple[float, float], float] = {}

        def evaluate(eq: float, ea: float) -> float:
            key = (round(eq, 12), round(ea, 12))
            if key in evaluated:
                return evaluated[key]
            quantizer.trial_group(ctx, step.names, mixed(eq, ea), originals, damp=damp,
                                  rescale=False)
            evaluated[key] = runner.input_error(nxt, search) / max(ref_energy, 1e-300)
            return evaluated[key]

        best = search_eps(evaluate, self.steps)
        logger.info(
            "block %d: adaptive eps search chose eps_q=%.3f eps_a=%.3f (attention-output rel. "
            "error %.4g on %s batches, %d evaluations)",
            ctx.index, best[0], best[1], evaluated[best],
            "held-out" if search else "all", len(evaluated),
        )
        # Re-run the chosen point through the normal path so that it is charged and reported.
        for rel in step.names:
            ctx.linears[rel].weight.copy_(originals[rel])
        return quantizer.quantize_group(ctx, step.names, mixed(*best), choice)


def search_eps(
    evaluate: Callable[[float, float], float], steps: int
) -> tuple[float, float]:
    """Coordinate search of ``(ε_q, ε_a)`` in ``[0, 1]²``: ε_q by golden section at ε_a = 0,
    then ε_a by golden section at the best ε_q; returns the best point evaluated.

    Args:
        evaluate: ``(ε_q, ε_a) -> error``; it should cache repeated points.
        steps (`int`): golden-section steps per coordinate.
    """
    seen: dict[tuple[float, float], float] = {}

    def f(eq: float, ea: float) -> float:
        key = (round(eq, 12), round(ea, 12))
        if key not in seen:
            seen[key] = evaluate(eq, ea)
        return seen[key]

    f(0.0, 0.0)
    f(1.0, 0.0)
    golden_section(lambda e: f(e, 0.0), steps)
    eq_best = min((k for k in seen if k[1] == 0.0), key=lambda k: seen[k])[0]
    f(eq_best, 1.0)
    golden_section(lambda e: f(eq_best, e), steps)
    return min(seen, key=lambda k: seen[k])


def golden_section(
    f: Callable[[float], float], steps: int, lo: float = 0.0, hi: float = 1.0
) -> float:
    """Golden-section search of ``f`` on ``[lo, hi]`` with ``steps`` shrinking steps; returns the
    midpoint of the final bracket (after evaluating it)."""
    if steps <= 0:
        return lo
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    mid = 0.5 * (a + b)
    f(mid)
    return mid
