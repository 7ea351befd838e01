"""Forward passes of one block: one float pass, then quantized passes that reuse cached outputs.

Pass structure per block with ``B`` calibration batches (algorithm.md §3), for ``G`` groups:

* **one float pass per batch**, before any Linear of the block is quantized. It runs the model's
  own block (still float) to the end and keeps, per batch, the input of every group's first
  Linear (``x``), the attention output the ``"mlp"`` residual needs, the attention each key
  receives (the probe), and the block output (the next float cache). The float path thus costs
  ``B`` passes instead of one per group, and needs no float copy of the block.
* **one quantized pass per group and batch**, stopped at the group's first Linear (``x̂``). The
  Linears of groups that are already final (quantized, with final inputs) do not recompute: the
  first pass after a group is finalized computes its outputs once and keeps them, later passes
  return the kept outputs (:class:`_OutputCache`). So across all passes every Linear runs once
  on the quantized path; what repeats is only the glue between Linears (norms, rotary, the
  attention kernel, activations).
* **one quantized pass per batch to the end**, for the next quantized cache — or none, when the
  block adds its Linears' outputs as ``(h + y_attn) + y_mlp`` bit for bit (checked on the
  discovery batch): the last group's pass keeps its input and the next cache is assembled from
  the kept ``y_attn`` and the final last Linear applied to that input (``5B + 1`` calls for
  ``G = 4``).

Total: ``B (float) + G·B (+ B next cache)`` block calls plus one discovery call; every Linear is
computed once per path. The values are the ones the old prefix-recomputing passes produced
(the same Linears on the same inputs), so the codes do not change.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..attention import install_probe, set_sink
from ..blocks import StopForward, residual_sum, run_block
from ..stats import importance_from_received
from .context import BlockContext, BlockPlan, GroupStep

__all__ = ["PairedBatch", "PairedRunner", "Tap", "probed_attention"]


@dataclass
class PairedBatch:
    """What the statistics of one group see from one batch (all on the compute device).

    Attributes:
        index (`int`): batch index.
        x_hat (`torch.Tensor` of shape ``(B, T, n)``): the group's input on the quantized path.
        x (`torch.Tensor` of shape ``(B, T, n)`` or None): the same on the float path.
        p (`torch.Tensor` of shape ``(B, T)`` or None): attention importance per token.
        dr (`torch.Tensor` of shape ``(B, T, hidden)`` or None): residual-stream error
            ``r − r̂`` for the group's residual role.
    """

    index: int
    x_hat: torch.Tensor
    x: torch.Tensor | None = None
    p: torch.Tensor | None = None
    dr: torch.Tensor | None = None


class Tap:
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

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def probed_attention(block: nn.Module) -> Iterator[list[PretrainedConfig]]:
    """Switch the attention of ``block`` to the probe for the duration of the context.

    The probe is installed on private copies of the configs the block's modules hold (the model's
    own config is shared by every block and saved with the checkpoint, so it is never touched);
    the modules get their original configs back on exit. No weight is copied.

    Yields:
        the probe configs (empty when the block has no transformers attention).
    """
    holders: list[tuple[nn.Module, PretrainedConfig]] = []
    copies: dict[int, PretrainedConfig] = {}
    for module in block.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            holders.append((module, cfg))
            if id(cfg) not in copies:
                copies[id(cfg)] = copy.deepcopy(cfg)
    try:
        for module, cfg in holders:
            module.config = copies[id(cfg)]
        yield install_probe(block) if holders else []
    finally:
        for module, cfg in holders:
            module.config = cfg


class _OutputCache:
    """Outputs of final Linears per batch, returned instead of recomputing them.

    A Linear's output may be reused once its weight is final and its input is final; both hold for
    every Linear of a finalized group, since groups are finalized in call order. The kept tensors
    live on ``cache_device``; each use gets a fresh copy on the compute device, so that code which
    modifies a Linear's output in place cannot corrupt the cache.
    """

    def __init__(self, linears: dict[str, nn.Module], batches: int, device: torch.device,
                 cache_device: torch.device) -> None:
        self.linears = linears
        self.final: set[str] = set()
        self.kept: list[dict[str, torch.Tensor]] = [{} for _ in range(batches)]
        self.device, self.cache_device = device, cache_device

    @contextlib.contextmanager
    def serve(self, batch: int, *, keep: bool = True) -> Iterator[None]:
        """During one pass of ``batch``: reuse kept outputs, keep new outputs of final Linears."""
        handles: list[Any] = []
        patched: list[nn.Module] = []
        kept = self.kept[batch]
        try:
            for name in self.final:
                lin = self.linears[name]
                if name in kept:
                    out = kept[name]
                    lin.forward = _constant(out, self.device)  # instance attribute shadows forward
                    patched.append(lin)
                elif keep:
                    handles.append(lin.register_forward_hook(self._keeper(kept, name)))
            yield
        finally:
            for h in handles:
                h.remove()
            for lin in patched:
                del lin.forward

    def _keeper(self, kept: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> None:
            kept.setdefault(name, output.detach().to(self.cache_device, copy=True))

        return hook

    def drop(self) -> None:
        self.kept = [{} for _ in self.kept]


def _constant(out: torch.Tensor, device: torch.device) -> Callable[..., torch.Tensor]:
    def forward(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return out.to(device, copy=True)

    return forward


def _sequential_sum(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise a clear error for NaN/inf activations (an overflowing model dtype)."""
    if not torch.isfinite(x).all():
        raise ValueError(
            f"NaN/inf in the calibration activations at {what}; the model overflows in its current "
            "dtype. Load it with dtype=torch.float32 (or bfloat16 instead of float16) and check "
            "its weights"
        )


class PairedRunner:
    """Runs one block's passes (see the module docstring) and pairs float and quantized inputs."""

    def __init__(self, ctx: BlockContext, plan: BlockPlan,
                 batch_sum: Callable[[list[float]], float] | None = None,
                 want_next: bool = True) -> None:
        self.ctx, self.plan = ctx, plan
        # The next quantized cache is assembled from kept parts instead of a block call: the
        # last group's input (kept during its pass) and the "attn" Linear's kept output.
        self._parts = want_next and plan.next_from_parts
        self._last_in: list[torch.Tensor | None] = [None] * ctx.batches
        # Adds per-batch scalars in batch order; a distributed run gathers every rank's batches.
        self.batch_sum = batch_sum or _sequential_sum
        self.calls = 0  # block forward calls, for the benchmark and the pass-count test
        self._outputs = _OutputCache(ctx.linears, ctx.batches, ctx.device, ctx.cache_device)
        # Float-path captures per batch, on the cache device.
        self._fx: list[dict[str, torch.Tensor]] = [{} for _ in range(ctx.batches)]
        self._fattn: list[torch.Tensor | None] = [None] * ctx.batches
        self._fp: list[torch.Tensor | None] = [None] * ctx.batches
        self.next_float: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ float path
    def run_float(self) -> None:
        """The float pass of every batch (call before any Linear of the block changes)."""
        ctx, plan = self.ctx, self.plan
        if not plan.float_path:
            return
        assert ctx.fcache is not None
        firsts = tuple(dict.fromkeys(g.first for g in plan.groups))
        outs = (plan.attn_linear,) if plan.needs_attn_output and plan.attn_linear else ()
        received: list[tuple[torch.Tensor, int]] = []
        if plan.needs_attention_weights:
            set_sink(ctx.probe, lambda r, h: received.append((r, h)))
        next_f: list[torch.Tensor] = []
        try:
            with Tap(ctx.linears, inputs=firsts, outputs=outs) as tap:
                for b in range(ctx.batches):
                    tap.clear()
                    received.clear()
                    out = self._call(ctx.fcache[b], b)
                    assert out is not None
                    next_f.append(out.to(ctx.cache_device))
                    self._fx[b] = {k: v.to(ctx.cache_device) for k, v in tap.inp.items()}
                    if outs:
                        self._fattn[b] = tap.out[outs[0]].to(ctx.cache_device)
                    if received:
                        r, heads = received[0]
                        self._fp[b] = importance_from_received(r, heads).to(ctx.cache_device)
        finally:
            if plan.needs_attention_weights:
                set_sink(ctx.probe, None)
        self.next_float = next_f

    def float_input(self, name: str, batch: int) -> torch.Tensor:
        """The float input of Linear ``name`` (a group's first) in ``batch``, on the device."""
        return self._fx[batch][name].to(self.ctx.device)

    # ------------------------------------------------------------------ quantized path
    def _call(self, hidden: torch.Tensor, batch: int) -> torch.Tensor | None:
        self.calls += 1
        return run_block(self.ctx.block, hidden.to(self.ctx.device), self.ctx.kwargs[batch])

    def paired(self, step: GroupStep) -> Iterator[PairedBatch]:
        """Per batch, a quantized pass stopped at the group's input, paired with the float path."""
        ctx, plan = self.ctx, self.plan
        attn = plan.attn_linear if step.residual == "mlp" else None
        outs = (attn,) if attn else ()
        with Tap(ctx.linears, inputs=(step.first,), outputs=outs, stop_before=step.first) as tap:
            for b in range(ctx.batches):
                tap.clear()
                with self._outputs.serve(b):
                    self._call(ctx.qcache[b], b)
                x_hat = tap.inp[step.first]
                check_finite(x_hat, f"the input of {step.first} (quantized path)")
                if step.last and self._parts:
                    self._keep_parts(b, x_hat)
                batch = PairedBatch(index=b, x_hat=x_hat)
                if plan.float_path:
                    assert ctx.fcache is not None
                    batch.x = self.float_input(step.first, b)
                    check_finite(batch.x, f"the input of {step.first} (float path)")
                    if step.weighted and self._fp[b] is not None:
                        batch.p = self._fp[b].to(ctx.device)
                    h_f = ctx.fcache[b].to(ctx.device)
                    h_q = ctx.qcache[b].to(ctx.device)
                    if step.residual == "attn":
                        batch.dr = h_f - h_q
                    elif step.residual == "mlp" and attn is not None:
                        f_out = self._fattn[b].to(ctx.device)
                        q_out = tap.out[attn]
                        batch.dr = (h_f + f_out.reshape(h_f.shape)) - (
                            h_q + q_out.reshape(h_q.shape)
                        )
                yield batch

    def input_error(self, name: str, batches: Sequence[int] | None = None) -> float:
        """``Σ_b ‖x̂_name − x_name‖²`` with the block's current weights (adaptive-ε search),
        over ``batches`` (default: all)."""
        ctx = self.ctx
        errs = []
        with Tap(ctx.linears, inputs=(name,), stop_before=name) as tap:
            for b in (range(ctx.batches) if batches is None else batches):
                tap.clear()
                with self._outputs.serve(b):
                    self._call(ctx.qcache[b], b)
                diff = tap.inp[name].float() - self.float_input(name, b).float()
                errs.append(float(diff.pow(2).sum()))
        return self.batch_sum(errs)

    def input_energy(self, name: str, batches: Sequence[int] | None = None) -> float:
        """``Σ_b ‖x_name‖²`` on the float path, over ``batches`` (default: all)."""
        idx = range(self.ctx.batches) if batches is None else batches
        return self.batch_sum([float(self._fx[b][name].float().pow(2).sum()) for b in idx])

    def finalize(self, step: GroupStep) -> None:
        """Mark a group's Linears final: later passes compute their outputs once, then reuse."""
        self._outputs.final.update(step.names)

    def release_float(self, step: GroupStep) -> None:
        """Drop the float inputs only ``step`` needed (they are not read again)."""
        later = {g.first for g in self.plan.groups if g.index > step.index}
        if step.first not in later:
            for fx in self._fx:
                fx.pop(step.first, None)

    def _keep_parts(self, batch: int, x_hat: torch.Tensor) -> None:
        """Keep what :meth:`next_caches` needs of ``batch`` (the last group's input and the
        "attn" Linear's output) and drop the other kept outputs, which nothing reads any more."""
        attn = self.plan.attn_linear
        kept = self._outputs.kept[batch]
        assert attn is not None and attn in kept, "the attn Linear's output was not kept"
        self._last_in[batch] = x_hat.detach().to(self.ctx.cache_device)
        for name in [n for n in kept if n != attn]:
            del kept[name]

    def next_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The block outputs on both paths (call after every group is final).

        Where the plan allows (:attr:`BlockPlan.next_from_parts`), the quantized output is
        ``(h + y_attn) + y_mlp`` with ``y_mlp`` the final last Linear applied to its kept input:
        the operations, hence the bits, of the block's own forward, without a block call.
        """
        ctx = self.ctx
        if self._parts and all(x is not None for x in self._last_in):
            return self._next_from_parts()
        new_q = []
        for b in range(ctx.batches):
            with self._outputs.serve(b, keep=False):
                out = self._call(ctx.qcache[b], b)
            assert out is not None
            new_q.append(out.to(ctx.cache_device))
        self._outputs.drop()
        new_f = self.next_float if self.next_float is not None else new_q
        return new_f, new_q

    def _next_from_parts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ctx, plan = self.ctx, self.plan
        assert plan.attn_linear is not None and plan.mlp_linear is not None
        mlp = ctx.linears[plan.mlp_linear]
        new_q = []
        for b in range(ctx.batches):
            x_last = self._last_in[b]
            assert x_last is not None
            h = ctx.qcache[b].to(ctx.device)
            y_attn = self._outputs.kept[b][plan.attn_linear].to(ctx.device)
            out = residual_sum(h, y_attn, mlp(x_last.to(ctx.device)))
            new_q.append(out.to(ctx.cache_device))
            self._last_in[b] = None
            self._outputs.kept[b] = {}
        self._outputs.drop()
        new_f = self.next_float if self.next_float is not None else new_q
        return new_f, new_q
