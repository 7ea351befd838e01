"""Quantize the Linears of one group: statistics validated and factored once, results observed.

The Linears of a group share an input, hence ``Σ_X``, ``Σ_X̂`` and ``Σ_XX̂``:
:func:`~watersic_hf.algorithm.prepare_statistics` checks, masks and Cholesky-factors them once
and each Linear reuses the result (q/k/v used to repeat it three times). Each Linear then gets its
rate target from :class:`RateControl`, is quantized, and its dequantized weight is written into
the block so that later groups see it; a :class:`LayerDone` event goes to every observer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ... import algorithm
from .context import BlockContext, LayerStats
from .observers import CalibrationObserver, LayerDone, LayerReport, RateControl

if TYPE_CHECKING:
    from .damping import DampChoice

__all__ = ["GroupQuantizer", "output_error_parts", "relative_output_error"]


def output_error_parts(
    weight: torch.Tensor, qweight: torch.Tensor, stats: LayerStats
) -> tuple[float, float]:
    """``(E‖W x − Ŵ x̂‖², E‖W x‖²)`` from second moments (x̂ = x in plain mode).

    Written as ``E‖W (x − x̂) + D x̂‖²`` with ``D = W − Ŵ`` so that no two large terms cancel; that
    keeps fp32 GEMMs accurate, which the CPU uses (fp64 on an accelerator). The small drift
    matrices ``E[(x − x̂)(x − x̂)ᵀ]`` and ``E[(x − x̂) x̂ᵀ]`` are formed in fp64 and every product
    is taken one column block at a time, so the report needs no ``(n, n)`` temporary at all.

    Args:
        weight (`torch.Tensor` of shape ``(a, n)``): float weight.
        qweight (`torch.Tensor` of shape ``(a, n)``): dequantized weight.
        stats (`LayerStats`): the statistics to measure with (those the layer was quantized with,
            or held-out ones).
    """
    sx = stats.sigma_x
    dev = sx.device
    dt = torch.float32 if dev.type == "cpu" else torch.float64
    f64 = torch.float64
    w = weight.to(dev, dt)
    d = w - qweight.to(dev, dt)
    sxh = stats.sigma_xhat
    sxxh = stats.sigma_x_xhat if stats.sigma_x_xhat is not None else sxh
    n = sx.shape[0]
    step = max(1, (1 << 20) // max(1, n))  # column blocks of ~1M entries (8 MB in fp64)
    ref = torch.zeros((), dtype=dt, device=dev)
    err = torch.zeros((), dtype=dt, device=dev)
    for i in range(0, n, step):
        c = slice(i, min(i + step, n))
        ref += ((w @ sx[:, c].to(dt)) * w[:, c]).sum()
        err += ((d @ (sxh if sxh is not None else sx)[:, c].to(dt)) * d[:, c]).sum()
        if sxh is not None and sxxh is not None:
            # Columns c of E[(x − x̂) x̂ᵀ] = Σ_XX̂ − Σ_X̂ and of
            # E[(x − x̂)(x − x̂)ᵀ] = Σ_X − Σ_XX̂ − (Σ_XX̂ − Σ_X̂)ᵀ, in fp64.
            s_cross = sxxh[:, c].to(f64) - sxh[:, c].to(f64)
            s_delta = sx[:, c].to(f64) - sxxh[:, c].to(f64) - (sxxh[c].to(f64) - sxh[c].to(f64)).T
            err += ((w @ s_delta.to(dt)) * w[:, c]).sum()
            err += 2 * ((w @ s_cross.to(dt)) * d[:, c]).sum()
    return float(err.clamp_min(0)), float(ref)


def relative_output_error(weight: torch.Tensor, qweight: torch.Tensor, stats: LayerStats) -> float:
    """``E‖W x − Ŵ x̂‖² / E‖W x‖²`` from second moments (see :func:`output_error_parts`).

    Args:
        weight (`torch.Tensor` of shape ``(a, n)``): float weight.
        qweight (`torch.Tensor` of shape ``(a, n)``): dequantized weight.
        stats (`LayerStats`): the statistics the layer was quantized with.
    """
    err, ref = output_error_parts(weight, qweight, stats)
    return err / max(ref, 1e-30)


def plain_relative_error(weight: torch.Tensor, qweight: torch.Tensor) -> float:
    """``‖W − Ŵ‖² / ‖W‖²`` (data-free methods)."""
    w = weight.double()
    return float((w - qweight.double()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-300))


class GroupQuantizer:
    """Quantizes groups of Linears with one method and settings.

    Args:
        config (`WaterSICConfig`): method, damping, dead-feature threshold, seed, ...
        rate (`RateControl`): the budget; asked for targets, charged through ``observers``.
        observers (`list`): receive a :class:`LayerDone` per final quantization (``rate``
            should be one of them).
    """

    def __init__(self, config: Any, rate: RateControl, observers: list[CalibrationObserver]):
        self.cfg = config
        self.method = config.method
        # The fixed damping: the user's, or the method's default. With automatic damping
        # (config.auto_damp) each group's damping comes from engine/damping.py instead, and this
        # value is only the fallback when no window can be held out.
        self.damp = config.effective_damp
        self.auto_damp = bool(getattr(config, "auto_damp", False))
        self.rate = rate
        self.observers = observers

    # ------------------------------------------------------------------ one Linear
    def _sigmas(self, stats: LayerStats) -> dict[str, torch.Tensor | None]:
        if self.method == "watersic":
            return {"sigma_xhat": stats.sigma_xhat, "sigma_x_xhat": stats.sigma_x_xhat}
        return {"sigma_xhat": None, "sigma_x_xhat": None}

    def prepare(self, stats: LayerStats, weight: torch.Tensor, damp: float | None = None) -> Any:
        """Validate, mask and factor ``stats`` once for every Linear of a group (``damp``: the
        relative damping, defaults to the fixed one)."""
        return algorithm.prepare_statistics(
            stats.sigma_x, **self._sigmas(stats), damp=self.damp if damp is None else damp,
            dead_threshold=self.cfg.dead_threshold, device=weight.device, n=weight.shape[1],
        )

    def _quantize(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any,
                  bits: float, target: str, damp: float | None = None,
                  rescale: bool | None = None) -> Any:
        cfg = self.cfg
        damp = self.damp if damp is None else damp
        rescale = cfg.rescale if rescale is None else rescale
        if self.method == "rtn":
            return algorithm.rtn_quantize(
                weight, None if stats is None else stats.sigma_x, bits,
                dead_threshold=cfg.dead_threshold, target=target,
            )
        assert stats is not None
        if self.method == "gptq":
            # Standard GPTQ has a fixed rate: the rate controller's target `bits` is ignored and
            # the fixed rate (QuantizedWeight.rate_bits) is what it is charged.
            return algorithm.gptq_quantize(
                weight, stats.sigma_x, int(cfg.bits), group_size=cfg.gptq_group_size,
                act_order=cfg.gptq_act_order, damp=damp,
                dead_threshold=cfg.dead_threshold, prepared=prepared,
            )
        if self.method == "gptq_entropy":
            return algorithm.gptq_entropy_quantize(
                weight, stats.sigma_x, bits, damp=damp, dead_threshold=cfg.dead_threshold,
                seed=cfg.seed, target=target, prepared=prepared,
            )
        return algorithm.watersic_quantize(
            weight, stats.sigma_x, bits, sigma_xhat=stats.sigma_xhat,
            sigma_x_xhat=stats.sigma_x_xhat, sigma_residual=stats.sigma_residual,
            damp=damp, lmmse=cfg.lmmse, rescale=rescale,
            dead_threshold=cfg.dead_threshold, seed=cfg.seed, target=target, prepared=prepared,
        )

    def solve_linear(self, name: str, linear: nn.Linear, stats: LayerStats | None,
                     prepared: Any = None, damp: float | None = None,
                     heldout_rel_err: float | None = None) -> LayerDone:
        """Quantize one Linear (its bit target asked from rate control); changes nothing.

        ``damp`` overrides the fixed damping (``prepared`` must have been made with it);
        ``heldout_rel_err`` is the held-out error measured when the damping was chosen, copied
        into the report.

        Returns:
            the :class:`LayerDone` event (report and quantized weight) for :meth:`apply_linear`.
        """
        start = time.perf_counter()
        weight = linear.weight.detach()
        n_dead = prepared.n_dead if prepared is not None else 0
        bits, target = self.rate.target(weight.shape[0], weight.shape[1], n_dead)
        damp = self.damp if damp is None else damp
        q = self._quantize(weight, stats, prepared, bits, target, damp=damp)
        deq = q.dequantize().to(weight.device)
        rel = (relative_output_error(weight, deq, stats) if stats is not None
               else plain_relative_error(weight, deq))
        report = LayerReport(
            name=name, rows=weight.shape[0], cols=weight.shape[1], bits=float(q.rate_bits),
            target_bits=float(bits), dead_columns=q.n_dead, rel_err=rel,
            seconds=time.perf_counter() - start,
            damp=float(damp) if self.method != "rtn" else None, heldout_rel_err=heldout_rel_err,
        )
        return LayerDone(report=report, quantized=q)

    def apply_linear(self, linear: nn.Linear, event: LayerDone) -> None:
        """Write the dequantized weight into ``linear`` (later statistics see the quantized
        layer) and notify the observers (rate control is charged here)."""
        with torch.no_grad():
            deq = event.quantized.dequantize().to(linear.weight.device)
            linear.weight.copy_(deq.to(linear.weight.dtype))
        for obs in self.observers:
            obs.on_layer(event)

    def quantize_linear(self, name: str, linear: nn.Linear, stats: LayerStats | None,
                        prepared: Any = None, damp: float | None = None,
                        heldout_rel_err: float | None = None) -> Any:
        """Quantize one Linear, write its dequantized weight back, notify the observers."""
        event = self.solve_linear(name, linear, stats, prepared, damp, heldout_rel_err)
        self.apply_linear(linear, event)
        return event.quantized

    # ------------------------------------------------------------------ one group
    def quantize_group(self, ctx: BlockContext, names: tuple[str, ...],
                       stats: LayerStats, choice: DampChoice | None = None) -> dict[str, Any]:
        """Quantize the Linears ``names`` of ``ctx.block`` (call order) with shared ``stats``,
        at the damping of ``choice`` (automatic damping) or the fixed one."""
        damp = self.damp if choice is None else choice.damp
        prepared = self.prepare(stats, ctx.linears[names[0]].weight, damp=damp)
        held = {} if choice is None else choice.heldout_rel_err
        return {
            rel: self.quantize_linear(ctx.qualified(rel), ctx.linears[rel], stats, prepared,
                                      damp, held.get(rel))
            for rel in names
        }

    def trial_group(self, ctx: BlockContext, names: tuple[str, ...], stats: LayerStats,
                    originals: dict[str, torch.Tensor], damp: float | None = None,
                    rescale: bool | None = None) -> dict[str, Any]:
        """Quantize ``originals`` of a group at ``stats`` for a search trial.

        The trial is charged to a copy of the budget and reported to nobody; the dequantized
        weights are written into the block so that the caller can measure their effect.
        """
        rate = self.rate.trial()
        prepared = self.prepare(stats, originals[names[0]], damp=damp)
        out = {}
        for rel in names:
            w = originals[rel]
            bits, target = rate.target(w.shape[0], w.shape[1], prepared.n_dead)
            q = self._quantize(w, stats, prepared, bits, target, damp=damp, rescale=rescale)
            rate.charge(q.rate_bits, *w.shape)
            ctx.linears[rel].weight.copy_(q.dequantize().to(w.device, w.dtype))
            out[rel] = q
        return out
