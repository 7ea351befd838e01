"""The sequential calibration loop (algorithm.md §3): quantize a float model block by block.

This module wires the staged engine (:mod:`watersic_hf.integration.engine`) together::

    capture block inputs ─► for each block (executor.onload):
        float pass per batch (probe on)   ─► x per group, p, attention output, next F_b
        plan the groups (q/k/v, o, gate/up, down — found by hooks)
        for each group: quantized pass per batch (final Linears served from cache) ─► x̂, Δr
                        statistics policy (fixed mix | adaptive ε) ─► group quantizer
                        (Σ validated and factored once; rate control and reports observe)
        next-cache pass ─► Q_b;  executor.finish: WaterSICLinear in, block home

Only one block lives on the compute device at a time and no float copy of it is made; the
activation caches stay on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import set_sink
from .blocks import BlockInputs, capture_block_inputs, discover_groups, find_decoder_blocks
from .data import calibration_windows, make_batches
from .engine import (
    BlockContext,
    GroupQuantizer,
    LayerReport,
    LayerStats,
    PairedRunner,
    ProgressBar,
    RateControl,
    ReportCollector,
    SingleDeviceExecutor,
    golden_section,
    make_plan,
    make_policy,
    probed_attention,
    relative_output_error,
)
from .engine.context import DeviceKwargs
from .engine.damping import holdout_batches
from .engine.distributed import (
    Communicator,
    DistributedGroupQuantizer,
    ShardedPolicy,
    shard_bounds,
)
from .engine.executor import OnloadingExecutor, has_offloaded_parameters
from .engine.resume import BlockStore, default_work_dir, fingerprint
from .replace import quantizable_linears

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "LayerReport", "LayerStats", "calibrate_model",
           "relative_output_error"]

# Kept under its old private name for callers of the pre-engine module.
_golden_section = golden_section


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_model`.

    Attributes:
        modules (`dict[str, nn.Module]`): the new ``WaterSICLinear`` modules by qualified name.
        reports (`list[LayerReport]`): per quantized Linear, in pipeline order.
        achieved_bits (`float`): rate over all quantized weights (paper accounting).
        tokens (`int`): calibration tokens used.
        seconds (`float`): wall time.
        block_calls (`list[int]`): forward calls of each calibrated block (float, quantized and
            discovery passes, early-stopped ones included).
        windows (`list[torch.LongTensor]`, *optional*): with ``config.finetune``, the calibration
            token ids per batch, ``(B, T)`` on the CPU.
        teacher_block_output (`list[torch.Tensor]`, *optional*): with ``config.finetune``, the
            float model's output of the last quantized block per batch, ``(B, T, hidden)`` on the
            cache device (the WaterSIC-FT teacher, see
            :func:`watersic_hf.integration.finetune.teacher_hidden_from_block_output`).
        teacher_block_index (`int`, *optional*): index of that block.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    achieved_bits: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    block_calls: list[int] = field(default_factory=list)
    windows: list[torch.Tensor] | None = None
    teacher_block_output: list[torch.Tensor] | None = None
    teacher_block_index: int | None = None


def _attention_marker(probe: list[Any]) -> Callable[[Callable[[], None]], Any]:
    @contextlib.contextmanager
    def marker(callback: Callable[[], None]) -> Iterator[None]:
        set_sink(probe, lambda _r, _h: callback())
        try:
            yield
        finally:
            set_sink(probe, None)

    return marker


class _Calibrator:
    """Runs the engine over every block of one model."""

    def __init__(self, model: nn.Module, config: Any, skip: list[str], tokenizer: Any) -> None:
        self.model = model
        self.cfg = config
        self.skip = skip
        self.tokenizer = tokenizer
        # A process group with several ranks (torchrun, or initialised by the caller) shares the
        # calibration windows between the ranks (engine/distributed.py).
        self.comm = Communicator.from_environment()
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.comm is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cpu = torch.device("cpu")
        # Blocks offloaded by accelerate (device_map with "disk") are read one at a time.
        self.executor = (OnloadingExecutor(device, cpu) if has_offloaded_parameters(model)
                         else SingleDeviceExecutor(device, cpu))
        self.method = config.method
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.result = CalibrationResult()
        # The float path is needed for drift statistics, residual compensation and attention
        # weights, and gives the WaterSIC-FT teacher (the float output of the last block).
        self.keep_teacher = self.method == "watersic" and bool(getattr(config, "finetune", False))
        self.need_float = self.method == "watersic" and (
            config.drift or config.residual_compensation or config.attention_weighted
            or self.keep_teacher
        )
        self._warned_no_attention = False
        self.held_out: frozenset[int] = frozenset()

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
        if not isinstance(self.executor, OnloadingExecutor):
            for name, p in self.model.named_parameters():
                if p.device.type == "meta":
                    raise ValueError(
                        f"parameter {name} is on the meta device without an offload hook; load "
                        "the model with from_pretrained (device_map=None, or device_map='auto' "
                        "with max_memory/offload_folder for a model larger than memory)"
                    )
        if self.comm is not None and self.keep_teacher:
            raise ValueError(
                "finetune=True is not supported in a distributed run (world size "
                f"{self.comm.world}); quantize in one process, then fine-tune the saved "
                "checkpoint with watersic_hf.finetune_scales"
            )
        if self.comm is not None and self.cfg.resume:
            raise ValueError(
                "resume=True is not supported in a distributed run (world size "
                f"{self.comm.world}); run without resume or in one process"
            )
        rate = RateControl(self.cfg.bits, total, enabled=self.cfg.rate_control)
        reports = ReportCollector()
        self.rate, self.reports = rate, reports
        if self.comm is not None:
            quantizer: GroupQuantizer = DistributedGroupQuantizer(
                self.cfg, rate, [rate, reports], self.comm
            )
        else:
            quantizer = GroupQuantizer(self.cfg, rate, [rate, reports])
        last = max(i for i, lin in enumerate(block_linears) if lin)
        n_blocks = len(self.blocks) if self.method == "rtn" else last + 1
        bar = ProgressBar(n_blocks, f"WaterSIC {self.method} {self.cfg.bits:g} bits", rate,
                          disable=self.comm is not None and not self.comm.first)
        try:
            if self.method == "rtn":
                self._run_data_free(block_linears, quantizer, bar)
            else:
                self._run_sequential(block_linears[: last + 1], quantizer, bar)
        finally:
            bar.close()
        self.result.reports = reports.reports
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

    def _finish(self, idx: int, block: nn.Module, quantized: dict[str, Any]) -> None:
        new = self.executor.finish(block, quantized, self.cfg.backend or "auto")
        for rel, module in new.items():
            self.result.modules[f"{self.prefix}.{idx}.{rel}"] = module

    def _run_data_free(
        self, block_linears: list[dict[str, nn.Linear]], quantizer: GroupQuantizer,
        bar: ProgressBar,
    ) -> None:
        for idx, block in enumerate(self.blocks):
            with self.executor.onload(block):
                quantized = {
                    rel: quantizer.quantize_linear(f"{self.prefix}.{idx}.{rel}", lin, None)
                    for rel, lin in block_linears[idx].items()
                }
                self._finish(idx, block, quantized)
            block_linears[idx] = {}  # the float Linears are garbage now (see _run_sequential)
            bar.on_block(idx)

    def _run_sequential(
        self, block_linears: list[dict[str, nn.Linear]], quantizer: GroupQuantizer,
        bar: ProgressBar,
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
        # Held-out batches for automatic damping (also the batches the adaptive-eps search
        # measures its error on), chosen among ALL batches so that a distributed run holds out
        # the same windows as one process (local indices below).
        n_all = len(batches)
        use_held = cfg.auto_damp or cfg.adaptive_eps_on
        held = holdout_batches(n_all, cfg.holdout_fraction) if use_held else []
        start_b = 0
        if self.comm is not None:
            start_b, stop_b = shard_bounds(n_all, self.comm.world)[self.comm.rank]
            batches = batches[start_b:stop_b]
        self.held_out = frozenset(i - start_b for i in held if 0 <= i - start_b < len(batches))
        if use_held and not held:
            logger.warning(
                "WaterSIC: automatic damping needs at least 2 calibration batches to hold one "
                "out (as does the adaptive-eps search's held-out error); using the fixed "
                "damp=%g and all batches (raise nsamples, or pass damp=...)",
                cfg.effective_damp,
            )
        elif held:
            logger.info("WaterSIC: automatic damping holds out %d of %d calibration batches",
                        len(held), n_all)
        inputs = capture_block_inputs(
            self.model, self.blocks, batches, self.executor.cache_device
        )
        self.result.tokens = (inputs.tokens if self.comm is None
                              else self.comm.sum_int(inputs.tokens))
        logger.info("WaterSIC calibration on %d tokens (%d windows)", self.result.tokens,
                    len(samples))
        fcache = list(inputs.hidden) if self.need_float else None
        qcache = list(inputs.hidden)
        store, start = None, 0
        if cfg.resume:
            fp = fingerprint(self.model, cfg, self.skip, inputs.hidden)
            store = BlockStore(cfg.work_dir or default_work_dir(fp), fp)
            state = store.load()
            if state is not None:
                start = self._restore(state, bar)
                fcache, qcache = state.fcache, state.qcache
                logger.info("resuming after block %d (work folder %s)", start - 1, store.folder)
        for idx in range(start, len(block_linears)):
            # The last block's outputs feed nothing that is quantized: no next-cache pass.
            want_next = idx + 1 < len(block_linears)
            fcache, qcache, quantized = self._calibrate_block(
                idx, self.blocks[idx], block_linears[idx], inputs, fcache, qcache, quantizer,
                want_next,
            )
            # The replaced float Linears are referenced only here now: let them go (an onloaded
            # block's float weights must not stay in memory).
            block_linears[idx] = {}
            if store is not None:
                ctl = self.rate.controller
                store.commit(idx, quantized, self.reports.reports, ctl.used_bits,
                             ctl.done_weights, fcache, qcache)
            bar.on_block(idx)
        if store is not None:
            store.remove()
        if self.keep_teacher:
            self.result.windows = batches
            self.result.teacher_block_output = fcache
            self.result.teacher_block_index = len(block_linears) - 1

    def _restore(self, state: Any, bar: ProgressBar) -> int:
        """Install the persisted blocks of a resumed run; returns the first block to calibrate."""
        for idx in range(state.finished):
            self._finish(idx, self.blocks[idx], state.weights[idx])
            bar.on_block(idx)
        self.rate.controller.used_bits = state.used_bits
        self.rate.controller.done_weights = state.done_weights
        self.reports.reports[:] = state.reports
        return state.finished

    # ------------------------------------------------------------------ one block
    def _calibrate_block(
        self,
        idx: int,
        block: nn.Module,
        linears: dict[str, nn.Linear],
        inputs: BlockInputs,
        fcache: list[torch.Tensor] | None,
        qcache: list[torch.Tensor],
        quantizer: GroupQuantizer,
        want_next: bool,
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor], dict[str, Any]]:
        ex = self.executor
        with ex.onload(block):
            ctx = BlockContext(
                index=idx,
                name=f"{self.prefix}.{idx}",
                block=block,
                linears=linears,
                qcache=qcache,
                fcache=fcache,
                kwargs=DeviceKwargs(inputs, idx, ex.device),
                device=ex.device,
                cache_device=ex.cache_device,
                held_out=self.held_out,
            )
            probing = probed_attention(block) if self.need_float else contextlib.nullcontext([])
            with probing as probe:
                ctx.probe = probe
                structure = None
                if self.comm is None or self.comm.first:
                    # Find the groups with the first batch; the probe also marks where attention
                    # happens, which places the residual-writing Linears.
                    structure = discover_groups(
                        block,
                        (fcache if fcache is not None else qcache)[0].to(ex.device),
                        ctx.kwargs[0],
                        linears,
                        attention_marker=_attention_marker(probe) if probe else None,
                    )
                if self.comm is not None:
                    # Every rank uses the structure found on global batch 0 (rank 0's first).
                    structure = self.comm.broadcast_object(structure, 0, torch.device("cpu"))
                self._warn_unprobed(block, structure.attention_seen)
                plan = make_plan(structure, self.cfg, float_path=self.need_float,
                                 probed=bool(probe))
                runner = PairedRunner(
                    ctx, plan, batch_sum=None if self.comm is None else self.comm.ordered_sum,
                    want_next=want_next,
                )
                runner.run_float()
            quantized: dict[str, Any] = {}
            for step in plan.groups:
                policy = make_policy(step, ctx, self.cfg)
                if self.comm is not None:
                    policy = ShardedPolicy(policy, ctx, self.comm)
                for batch in runner.paired(step):
                    policy.add(batch)
                quantized.update(policy.solve(quantizer, runner))
                del policy  # frees the group's moment sums before the next group
                runner.finalize(step)
                runner.release_float(step)
            if want_next:
                new_f, new_q = runner.next_caches()
            else:  # last block: only the float output, and only as the fine-tuning teacher
                new_f, new_q = (runner.next_float if self.keep_teacher else None), []
            self.result.block_calls.append(runner.calls + 1)  # + the discovery call
            self._finish(idx, block, quantized)
        return (new_f if self.need_float else None), new_q, quantized

    def _warn_unprobed(self, block: nn.Module, attention_seen: bool) -> None:
        if (self.cfg.attention_weighted and self.need_float and not attention_seen
                and not self._warned_no_attention):
            logger.warning(
                "attention_weighted: the attention of %s does not go through transformers' "
                "attention interface, so q/k/v use unweighted statistics",
                type(block).__name__,
            )
            self._warned_no_attention = True


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
