"""The sequential calibration loop (algorithm.md §3): quantize a float model block by block.

Map of one block (names are the ones used below)::

    float cache F_b ─► fblock (deep copy, float, probe on its attention) ─► next F_b
    quant cache Q_b ─► qblock (the model's own block, quantized group by group) ─► next Q_b

    for each group g of Linears sharing an input (q/k/v, o, gate/up, down — found by hooks):
        for each batch b:   run fblock on F_b up to g  → x (input), r (residual), p (attention)
                            run qblock on Q_b up to g  → x̂, r̂
                            accumulate Σ_X, Σ_X̂, Σ_XX̂ (weighted for q/k/v), Σ_ΔR  [fp64]
        for each Linear of g (call order): rate target → quantize → put Ŵ into qblock
    replace the block's Linears by WaterSICLinear, move the block back to its home device

Only one block (plus its float copy) lives on the compute device at a time; the activation caches
stay on the CPU. Every forward that only needs the input of some Linear stops right there
(:class:`~watersic_hf.integration.blocks.StopForward`), so collecting the statistics of the q/k/v
group costs little more than a layer norm.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import algorithm
from .attention import install_probe, set_sink
from .blocks import (
    BlockInputs,
    BlockStructure,
    LinearGroup,
    StopForward,
    capture_block_inputs,
    discover_groups,
    find_decoder_blocks,
    move_to,
    run_block,
)
from .data import calibration_windows, make_batches
from .rate_control import RateController
from .replace import quantizable_linears, set_submodule
from .stats import MomentAccumulator, importance_from_received

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "LayerReport", "calibrate_model", "relative_output_error"]


# --------------------------------------------------------------------------------------------------
# Small data holders


@dataclass
class LayerStats:
    """Statistics handed to the single-layer quantizer (all fp64, on the compute device).

    ``sigma_x`` is always set; the others are None in plain mode.
    """

    sigma_x: torch.Tensor
    sigma_xhat: torch.Tensor | None = None
    sigma_x_xhat: torch.Tensor | None = None
    sigma_residual: torch.Tensor | None = None


@dataclass
class LayerReport:
    """What happened to one Linear (also written into ``WaterSICConfig.layers``)."""

    name: str
    rows: int
    cols: int
    bits: float
    target_bits: float
    dead_columns: int
    rel_err: float
    seconds: float


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_model`.

    Attributes:
        modules (`dict[str, nn.Module]`): the new ``WaterSICLinear`` modules by qualified name.
        reports (`list[LayerReport]`): per quantized Linear, in pipeline order.
        achieved_bits (`float`): rate over all quantized weights (paper accounting).
        tokens (`int`): calibration tokens used.
        seconds (`float`): wall time.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    achieved_bits: float = 0.0
    tokens: int = 0
    seconds: float = 0.0


def relative_output_error(weight: torch.Tensor, qweight: torch.Tensor, stats: LayerStats) -> float:
    """``E‖W x − Ŵ x̂‖² / E‖W x‖²`` from second moments (x̂ = x in plain mode).

    Written as ``E‖W (x − x̂) + D x̂‖²`` with ``D = W − Ŵ`` so that no two large terms cancel; that
    keeps fp32 GEMMs accurate, which the CPU uses (fp64 on an accelerator).

    Args:
        weight (`torch.Tensor` of shape ``(a, n)``): float weight.
        qweight (`torch.Tensor` of shape ``(a, n)``): dequantized weight.
        stats (`LayerStats`): the statistics the layer was quantized with.
    """
    sx = stats.sigma_x
    dt = torch.float32 if sx.device.type == "cpu" else torch.float64
    w = weight.to(sx.device, dt)
    d = w - qweight.to(sx.device, dt)
    sxh = (stats.sigma_xhat if stats.sigma_xhat is not None else sx).to(dt)
    ref = ((w @ sx.to(dt)) * w).sum()
    err = ((d @ sxh) * d).sum()
    if stats.sigma_xhat is not None:
        sxxh = (stats.sigma_x_xhat if stats.sigma_x_xhat is not None else stats.sigma_xhat)
        # E[(x − x̂)(x − x̂)ᵀ] and E[(x − x̂) x̂ᵀ], both small: the drift.
        s_cross = sxxh.to(torch.float64) - stats.sigma_xhat.to(torch.float64)
        s_delta = sx.to(torch.float64) - sxxh.to(torch.float64) - s_cross.T
        err = err + ((w @ s_delta.to(dt)) * w).sum() + 2 * ((w @ s_cross.to(dt)) * d).sum()
    return float(err.clamp_min(0) / ref.clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# Hooks for one pass of a block over the calibration batches


class _Tap:
    """Forward hooks for one pass: keep some Linears' inputs/outputs, optionally stop before one."""

    def __init__(
        self,
        linears: dict[str, nn.Module],
        *,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        stop_before: str | None = None,
    ) -> None:
        self.inp: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        for name in inputs:
            self._handles.append(linears[name].register_forward_pre_hook(self._keep_input(name)))
        for name in outputs:
            self._handles.append(linears[name].register_forward_hook(self._keep_output(name)))
        if stop_before is not None:
            # Registered after the input hooks, so a Linear can be both captured and the stop point.
            self._handles.append(linears[stop_before].register_forward_pre_hook(self._stop))

    def _keep_input(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.inp.setdefault(name, args[0])

        return hook

    def _keep_output(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.out.setdefault(name, output)

        return hook

    @staticmethod
    def _stop(_m: nn.Module, _args: tuple[Any, ...]) -> None:
        raise StopForward

    def clear(self) -> None:
        self.inp.clear()
        self.out.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def _tap(linears: dict[str, nn.Module], **kwargs: Any) -> Iterator[_Tap]:
    tap = _Tap(linears, **kwargs)
    try:
        yield tap
    finally:
        tap.close()


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(
            f"NaN/inf in the calibration activations at {what}; the model overflows in its current "
            "dtype. Load it with dtype=torch.float32 (or bfloat16 instead of float16) and check "
            "its weights"
        )


# --------------------------------------------------------------------------------------------------
# The calibrator


class _Calibrator:
    def __init__(self, model: nn.Module, config: Any, skip: list[str], tokenizer: Any) -> None:
        self.model = model
        self.cfg = config
        self.skip = skip
        self.tokenizer = tokenizer
        self.device = torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.cache_device = torch.device("cpu")
        self.method = config.method
        self.damp = config.effective_damp
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.result = CalibrationResult()
        # The float path is needed for drift statistics, residual compensation and attention
        # weights.
        self.need_float = self.method == "watersic" and (
            config.drift or config.residual_compensation or config.attention_weighted
        )
        self._warned_no_attention = False

    # ------------------------------------------------------------------ quantizing one Linear
    def _quantize(self, weight: torch.Tensor, stats: LayerStats | None, bits: float, target: str):
        cfg = self.cfg
        if self.method == "rtn":
            return algorithm.rtn_quantize(
                weight,
                None if stats is None else stats.sigma_x,
                bits,
                dead_threshold=cfg.dead_threshold,
                target=target,
            )
        assert stats is not None
        if self.method == "gptq":
            return algorithm.gptq_quantize(
                weight,
                stats.sigma_x,
                bits,
                damp=self.damp,
                dead_threshold=cfg.dead_threshold,
                seed=cfg.seed,
                target=target,
            )
        return algorithm.watersic_quantize(
            weight,
            stats.sigma_x,
            bits,
            sigma_xhat=stats.sigma_xhat,
            sigma_x_xhat=stats.sigma_x_xhat,
            sigma_residual=stats.sigma_residual,
            damp=self.damp,
            lmmse=cfg.lmmse,
            rescale=cfg.rescale,
            dead_threshold=cfg.dead_threshold,
            seed=cfg.seed,
            target=target,
        )

    def _bits_for(
        self, rate: RateController, weight: torch.Tensor, stats: LayerStats | None
    ) -> tuple[float, str]:
        if not self.cfg.rate_control:
            return self.cfg.bits, "original"
        n_dead = 0
        if stats is not None:
            n_dead = int(
                algorithm.find_dead_columns(stats.sigma_x, self.cfg.dead_threshold).numel()
            )
        return rate.target(weight.shape[0], weight.shape[1], n_dead), "live"

    def _quantize_linear(
        self, full_name: str, linear: nn.Linear, stats: LayerStats | None, rate: RateController
    ) -> Any:
        start = time.perf_counter()
        weight = linear.weight.detach()
        bits, target = self._bits_for(rate, weight, stats)
        q = self._quantize(weight, stats, bits, target)
        rate.charge(q.rate_bits, *weight.shape)
        deq = q.dequantize().to(weight.device)
        rel = (
            relative_output_error(weight, deq, stats)
            if stats is not None
            else _plain_rel_err(weight, deq)
        )
        with torch.no_grad():
            # Later statistics see the quantized layer.
            linear.weight.copy_(deq.to(linear.weight.dtype))
        report = LayerReport(
            name=full_name,
            rows=weight.shape[0],
            cols=weight.shape[1],
            bits=float(q.rate_bits),
            target_bits=float(bits),
            dead_columns=q.n_dead,
            rel_err=rel,
            seconds=time.perf_counter() - start,
        )
        self.result.reports.append(report)
        logger.info(
            "%s: %.3f bits (target %.3f), %d dead columns, relative output error %.4g, %.1fs",
            full_name,
            report.bits,
            report.target_bits,
            report.dead_columns,
            report.rel_err,
            report.seconds,
        )
        return q

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def run(self) -> CalibrationResult:
        start = time.perf_counter()
        block_linears = [
            quantizable_linears(block, f"{self.prefix}.{i}", self.skip)
            for i, block in enumerate(self.blocks)
        ]
        total = sum(m.weight.numel() for lin in block_linears for m in lin.values())
        if total == 0:
            raise ValueError(
                f"{type(self.model).__name__} has no nn.Linear left to quantize inside its decoder "
                f"blocks (modules_to_not_convert={self.skip}); remove entries from "
                "modules_to_not_convert"
            )
        for name, p in self.model.named_parameters():
            if p.device.type == "meta":
                raise ValueError(
                    f"parameter {name} is offloaded (on the meta device); WaterSIC calibration "
                    "needs every weight in memory: load with device_map=None (CPU) or without "
                    "disk offload"
                )
        rate = RateController(self.cfg.bits, total)
        if self.method == "rtn":
            self._run_data_free(block_linears, rate)
        else:
            self._run_sequential(block_linears, rate)
        self.result.achieved_bits = rate.achieved_bits
        self.result.seconds = time.perf_counter() - start
        logger.info(
            "WaterSIC (%s): %d layers quantized, %.4f bits per weight (target %.4f), %.1fs",
            self.method,
            len(self.result.reports),
            rate.achieved_bits,
            self.cfg.bits,
            self.result.seconds,
        )
        return self.result

    def _progress(self, total: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=f"WaterSIC {self.method} {self.cfg.bits:g} bits",
            unit="block",
        )

    def _finish_block(
        self, idx: int, block: nn.Module, quantized: dict[str, Any], home: torch.device
    ) -> None:
        """Swap the block's quantized Linears for WaterSICLinear and send the block home."""
        from ..nn import WaterSICLinear

        backend = self.cfg.backend or "auto"
        for rel, q in quantized.items():
            old = block.get_submodule(rel)
            bias = old.bias.detach() if old.bias is not None else None
            dtype = bias.dtype if bias is not None else old.weight.dtype
            new = WaterSICLinear.from_quantized(q, bias, dtype=dtype, backend=backend)
            new.requires_grad_(False)
            set_submodule(block, rel, new)
            self.result.modules[f"{self.prefix}.{idx}.{rel}"] = new
        block.to(home)

    def _run_data_free(
        self, block_linears: list[dict[str, nn.Linear]], rate: RateController
    ) -> None:
        with self._progress(len(self.blocks)) as bar:
            for idx, (block, linears) in enumerate(zip(self.blocks, block_linears, strict=True)):
                home = _home_device(block)
                block.to(self.device)
                quantized = {
                    rel: self._quantize_linear(f"{self.prefix}.{idx}.{rel}", lin, None, rate)
                    for rel, lin in linears.items()
                }
                self._finish_block(idx, block, quantized, home)
                bar.set_postfix(bits=f"{rate.achieved_bits:.3f}")
                bar.update(1)

    def _run_sequential(
        self, block_linears: list[dict[str, nn.Linear]], rate: RateController
    ) -> None:
        cfg = self.cfg
        text_cfg = (
            self.model.config.get_text_config()
            if hasattr(self.model.config, "get_text_config")
            else None
        )
        vocab = getattr(text_cfg or self.model.config, "vocab_size", None)
        samples = calibration_windows(
            cfg.dataset,
            self.tokenizer,
            nsamples=cfg.nsamples,
            seqlen=cfg.seqlen,
            seed=cfg.seed,
            model=self.model,
            vocab_size=vocab,
        )
        batches = make_batches(samples, cfg.batch_size)
        inputs = capture_block_inputs(self.model, self.blocks, batches, self.cache_device)
        self.result.tokens = inputs.tokens
        logger.info("WaterSIC calibration on %d tokens (%d windows)", inputs.tokens, len(samples))
        fcache = list(inputs.hidden)
        qcache = list(inputs.hidden)
        # Blocks after the last one with something to quantize need no forward at all.
        last = max(i for i, lin in enumerate(block_linears) if lin)
        with self._progress(last + 1) as bar:
            for idx, block in enumerate(self.blocks[: last + 1]):
                fcache, qcache = self._calibrate_block(
                    idx, block, block_linears[idx], inputs, fcache, qcache, rate
                )
                bar.set_postfix(bits=f"{rate.achieved_bits:.3f}")
                bar.update(1)

    # ------------------------------------------------------------------ one block
    def _calibrate_block(
        self,
        idx: int,
        block: nn.Module,
        linears: dict[str, nn.Linear],
        inputs: BlockInputs,
        fcache: list[torch.Tensor],
        qcache: list[torch.Tensor],
        rate: RateController,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        home = _home_device(block)
        block.to(self.device)
        fblock = copy.deepcopy(block) if self.need_float else None
        # The probe also marks where attention happens, which places the residual-writing Linears.
        probe = install_probe(fblock) if fblock is not None else []
        flinears = {rel: fblock.get_submodule(rel) for rel in linears} if fblock is not None else {}
        kwargs = _DeviceKwargs(inputs, idx, self.device)

        # Find the groups on the float copy (its attention is probed) with the first batch.
        marker = _attention_marker(probe) if probe else None
        structure = discover_groups(
            fblock if fblock is not None else block,
            (fcache if fblock is not None else qcache)[0].to(self.device),
            kwargs[0],
            flinears if fblock is not None else linears,
            attention_marker=marker,
        )
        if self.cfg.attention_weighted and self.need_float and not structure.attention_seen:
            if not self._warned_no_attention:
                logger.warning(
                    "attention_weighted: the attention of %s does not go through transformers' "
                    "attention interface, so q/k/v use unweighted statistics",
                    type(block).__name__,
                )
                self._warned_no_attention = True

        quantized: dict[str, Any] = {}
        next_f: list[torch.Tensor] | None = None
        for gi, group in enumerate(structure.groups):
            nxt = structure.groups[gi + 1].names[0] if gi + 1 < len(structure.groups) else None
            last = gi == len(structure.groups) - 1
            weighted = self.cfg.attention_weighted and group.attention_input and bool(probe)
            if (
                self.method == "watersic"
                and self.cfg.adaptive_eps
                and weighted
                and self.cfg.drift
                and nxt
            ):
                stats_fn = self._adaptive_group
            else:
                stats_fn = self._plain_group
            next_f_group = stats_fn(
                idx,
                group,
                nxt,
                last,
                block,
                fblock,
                linears,
                flinears,
                probe,
                fcache,
                qcache,
                kwargs,
                weighted,
                structure,
                rate,
                quantized,
            )
            if next_f_group is not None:
                next_f = next_f_group

        # Next caches: the quantized block on the quantized path; the float block on the float path.
        new_q = [self._forward(block, qcache[b], kwargs[b]) for b in range(len(qcache))]
        if fblock is None:
            new_f = new_q
        elif next_f is not None:
            new_f = next_f
        else:
            new_f = [self._forward(fblock, fcache[b], kwargs[b]) for b in range(len(fcache))]
        del fblock
        self._finish_block(idx, block, quantized, home)
        return new_f, new_q

    def _forward(
        self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = run_block(block, hidden.to(self.device), kwargs)
        assert out is not None
        return out.to(self.cache_device)

    # ------------------------------------------------------------------ statistics of one group
    def _collect(
        self,
        group: LinearGroup,
        nxt: str | None,
        last: bool,
        block: nn.Module,
        fblock: nn.Module | None,
        linears: dict[str, nn.Linear],
        flinears: dict[str, nn.Module],
        probe: list[Any],
        fcache: list[torch.Tensor],
        qcache: list[torch.Tensor],
        kwargs: list[dict[str, Any]],
        weighted: bool,
        structure: BlockStructure,
        sink: Callable[
            [int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], None
        ],
        keep_reference: bool = False,
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """One paired pass over all batches; calls ``sink(b, x̂, x, p, Δr)`` per batch.

        Returns:
            (next float cache when the float pass ran to the end, else None;
             float inputs of ``nxt`` per batch when ``keep_reference``)
        """
        first = group.names[0]
        attn_lin = next((g.names[0] for g in structure.groups if g.residual == "attn"), None)
        residual = (
            group.residual if self.cfg.residual_compensation and self.method == "watersic" else None
        )
        need_attn_out = residual == "mlp" and attn_lin is not None
        # The float pass must reach the attention when weights are needed, and the end of the block
        # for the last group (its output is the next float cache).
        if fblock is None:
            f_stop = None
        elif last:
            f_stop = None
        elif weighted or keep_reference:
            f_stop = nxt
        else:
            f_stop = first
        f_inputs = (first,) + ((nxt,) if keep_reference and nxt else ())
        outs = (attn_lin,) if need_attn_out else ()
        received: list[tuple[torch.Tensor, int]] = []
        next_f: list[torch.Tensor] = []
        refs: list[torch.Tensor] = []
        if weighted:
            set_sink(probe, lambda r, h: received.append((r, h)))
        try:
            with (
                _tap(linears, inputs=(first,), outputs=outs, stop_before=first) as qtap,
                (
                    _tap(flinears, inputs=f_inputs, outputs=outs, stop_before=f_stop)
                    if fblock is not None
                    else _null_tap()
                ) as ftap,
            ):
                for b in range(len(qcache)):
                    qtap.clear()
                    kw = kwargs[b]
                    h_q = qcache[b].to(self.device)
                    run_block(block, h_q, kw)
                    x_hat = qtap.inp[first]
                    _check_finite(x_hat, f"the input of {first} (quantized path)")
                    x = p = dr = None
                    if fblock is not None:
                        ftap.clear()
                        received.clear()
                        h_f = fcache[b].to(self.device)
                        out = run_block(fblock, h_f, kw)
                        if last:
                            next_f.append(out.to(self.cache_device))
                        x = ftap.inp[first]
                        _check_finite(x, f"the input of {first} (float path)")
                        if keep_reference and nxt is not None:
                            refs.append(ftap.inp[nxt].to(self.cache_device))
                        if weighted and received:
                            r, heads = received[0]
                            p = importance_from_received(r, heads)
                        if residual == "attn":
                            dr = h_f - h_q
                        elif residual == "mlp" and need_attn_out:
                            dr = (h_f + ftap.out[attn_lin].reshape(h_f.shape)) - (
                                h_q + qtap.out[attn_lin].reshape(h_q.shape)
                            )
                    sink(b, x_hat, x, p, dr)
        finally:
            if weighted:
                set_sink(probe, None)
        return (next_f if last and fblock is not None else None), refs

    def _plain_group(
        self,
        idx,
        group,
        nxt,
        last,
        block,
        fblock,
        linears,
        flinears,
        probe,
        fcache,
        qcache,
        kwargs,
        weighted,
        structure,
        rate,
        quantized,
    ) -> list[torch.Tensor] | None:
        cfg = self.cfg
        n = linears[group.names[0]].in_features
        dev = self.device
        eps = cfg.attn_eps
        acc: dict[str, MomentAccumulator] = {"xhat": MomentAccumulator(n, n, dev)}
        drift = fblock is not None and cfg.drift
        if drift:
            acc["x"] = MomentAccumulator(n, n, dev)
            acc["cross"] = MomentAccumulator(n, n, dev)
        res_rows = None
        residual = group.residual if (cfg.residual_compensation and fblock is not None) else None
        if residual is not None:
            res_rows = linears[group.names[0]].out_features
            acc["res"] = MomentAccumulator(res_rows, n, dev)

        def sink(b, x_hat, x, p, dr):
            w = None if p is None else (1.0 - eps) * p + eps
            acc["xhat"].add(x_hat, weight=w)
            if drift:
                acc["x"].add(x, weight=w)
                acc["cross"].add(x, x_hat, weight=w)
            if "res" in acc and dr is not None:
                acc["res"].add(dr, x_hat)

        next_f, _ = self._collect(
            group,
            nxt,
            last,
            block,
            fblock,
            linears,
            flinears,
            probe,
            fcache,
            qcache,
            kwargs,
            weighted,
            structure,
            sink,
        )
        if drift:
            stats = LayerStats(acc["x"].get(), acc["xhat"].get(), acc["cross"].get())
        else:
            stats = LayerStats(acc["xhat"].get())
        if "res" in acc and acc["res"].tokens:
            stats.sigma_residual = acc["res"].get()
        for rel in group.names:
            quantized[rel] = self._quantize_linear(
                f"{self.prefix}.{idx}.{rel}", linears[rel], stats, rate
            )
        return next_f

    # ------------------------------------------------------------------ adaptive (ε_q, ε_a) search
    def _adaptive_group(
        self,
        idx,
        group,
        nxt,
        last,
        block,
        fblock,
        linears,
        flinears,
        probe,
        fcache,
        qcache,
        kwargs,
        weighted,
        structure,
        rate,
        quantized,
    ) -> list[torch.Tensor] | None:
        n = linears[group.names[0]].in_features
        dev = self.device
        acc = {
            k: MomentAccumulator(n, n, dev) for k in ("x", "xhat", "cross", "wx", "wxhat", "wcross")
        }

        def sink(b, x_hat, x, p, dr):
            acc["x"].add(x)
            acc["xhat"].add(x_hat)
            acc["cross"].add(x, x_hat)
            if p is not None:
                acc["wx"].add(x, weight=p)
                acc["wxhat"].add(x_hat, weight=p)
                acc["wcross"].add(x, x_hat, weight=p)

        next_f, refs = self._collect(
            group,
            nxt,
            last,
            block,
            fblock,
            linears,
            flinears,
            probe,
            fcache,
            qcache,
            kwargs,
            weighted,
            structure,
            sink,
            keep_reference=True,
        )
        m = {k: a.get() for k, a in acc.items() if a.tokens}
        if "wx" not in m:  # the probe did not fire: fall back to unweighted statistics
            m.update(wx=m["x"], wxhat=m["xhat"], wcross=m["cross"])
        originals = {rel: linears[rel].weight.detach().clone() for rel in group.names}
        ref_energy = sum(float(r.float().pow(2).sum()) for r in refs)

        def mixed(eq: float, ea: float) -> LayerStats:
            def blend(kind: str) -> torch.Tensor:
                fam = {}
                for pre in ("w", ""):
                    x = m[pre + "x"]
                    if kind == "x":
                        fam[pre] = x
                    else:
                        fam[pre] = (1 - eq) * m[pre + kind] + eq * x
                return (1 - ea) * fam["w"] + ea * fam[""]

            return LayerStats(blend("x"), blend("xhat"), blend("cross"))

        evaluated: dict[tuple[float, float], tuple[float, dict[str, Any]]] = {}

        def evaluate(eq: float, ea: float) -> float:
            key = (round(eq, 12), round(ea, 12))
            if key in evaluated:
                return evaluated[key][0]
            stats = mixed(eq, ea)
            trial = copy.deepcopy(rate)
            qs: dict[str, Any] = {}
            for rel in group.names:
                w = originals[rel]
                bits, target = self._bits_for(trial, w, stats)
                q = self._quantize(w, stats, bits, target)
                trial.charge(q.rate_bits, *w.shape)
                qs[rel] = q
                linears[rel].weight.copy_(q.dequantize().to(w.device, w.dtype))
            err = 0.0
            with _tap(linears, inputs=(nxt,), stop_before=nxt) as tap:
                for b in range(len(qcache)):
                    tap.clear()
                    run_block(block, qcache[b].to(self.device), kwargs[b])
                    diff = tap.inp[nxt].float() - refs[b].to(self.device).float()
                    err += float(diff.pow(2).sum())
            rel_err = err / max(ref_energy, 1e-300)
            evaluated[key] = (rel_err, qs)
            return rel_err

        steps = self.cfg.adaptive_eps_steps
        evaluate(0.0, 0.0)
        evaluate(1.0, 0.0)
        _golden_section(lambda e: evaluate(e, 0.0), steps)
        eq_best = min((k for k in evaluated if k[1] == 0.0), key=lambda k: evaluated[k][0])[0]
        evaluate(eq_best, 1.0)
        _golden_section(lambda e: evaluate(eq_best, e), steps)
        best = min(evaluated, key=lambda k: evaluated[k][0])
        logger.info(
            "block %d: adaptive eps search chose eps_q=%.3f eps_a=%.3f (attention-output rel. "
            "error %.4g, %d evaluations)",
            idx,
            best[0],
            best[1],
            evaluated[best][0],
            len(evaluated),
        )
        # Re-run the chosen point through the normal path so that it is charged and reported.
        for rel in group.names:
            linears[rel].weight.copy_(originals[rel])
        stats = mixed(*best)
        for rel in group.names:
            quantized[rel] = self._quantize_linear(
                f"{self.prefix}.{idx}.{rel}", linears[rel], stats, rate
            )
        return next_f


def _golden_section(
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


class _DeviceKwargs:
    """Block kwargs per batch, moved to the compute device only when used (masks can be large)."""

    def __init__(self, inputs: BlockInputs, block_idx: int, device: torch.device) -> None:
        self._inputs, self._idx, self._device = inputs, block_idx, device

    def __len__(self) -> int:
        return len(self._inputs.kwargs)

    def __getitem__(self, batch_idx: int) -> dict[str, Any]:
        return move_to(self._inputs.block_kwargs(self._idx, batch_idx), self._device)


@contextmanager
def _null_tap() -> Iterator[None]:
    yield None


def _attention_marker(probe: list[Any]) -> Callable[[Callable[[], None]], Any]:
    @contextmanager
    def marker(callback: Callable[[], None]) -> Iterator[None]:
        set_sink(probe, lambda _r, _h: callback())
        try:
            yield
        finally:
            set_sink(probe, None)

    return marker


def _home_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


def _plain_rel_err(weight: torch.Tensor, qweight: torch.Tensor) -> float:
    w = weight.double()
    return float((w - qweight.double()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-300))


def calibrate_model(
    model: nn.Module,
    config: Any,
    *,
    modules_to_not_convert: list[str] | None = None,
    tokenizer: Any = None,
) -> CalibrationResult:
    """Quantize every ``nn.Linear`` inside the decoder blocks of ``model`` in place.

    Args:
        model (`PreTrainedModel`): a float decoder-only model, fully materialised (no disk offload).
        config (`WaterSICConfig`): bits, method, data and options.
        modules_to_not_convert (`list[str]`, *optional*): names/patterns to keep in float.
        tokenizer (*optional*): overrides ``config.tokenizer``.

    Returns:
        [`CalibrationResult`]; the model's Linears are replaced by ``WaterSICLinear``.

    Raises:
        ValueError: bad data, nothing to quantize, offloaded weights, NaN activations.
    """
    from .plan import plan_calibration

    # Device-aware nsamples/seqlen (when None), the CPU time estimate, the small-set warning.
    plan_calibration(model, config, modules_to_not_convert or [])
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        calib = _Calibrator(
            model,
            config,
            list(modules_to_not_convert or []),
            tokenizer if tokenizer is not None else config.tokenizer,
        )
        return calib.run()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
