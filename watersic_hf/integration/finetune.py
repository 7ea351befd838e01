"""WaterSIC-FT (algorithm.md §3.10): KL distillation of the per-row and per-column scales.

Only the fp16 scales of every :class:`~watersic_hf.nn.WaterSICLinear` move — ``t`` (per output
row, ``weight_row_scale``) and ``g`` (per input column, ``weight_col_scale``); the integer codes,
hence the rate, stay as they are. Everything else in the model is frozen.

* **Trainable copies.** fp32 copies of ``t`` and ``g`` are trained, as factors on the stored
  values (``t₀ ⊙ u``, ``u`` starting at 1: the paper's ``t``, ``g`` are near 1, ours carry the
  step sizes, so the factor form keeps the paper's learning rate meaningful). The forward uses
  :func:`fp16_ste` of them — rounded to fp16 (clamped into the normal fp16 range) with an identity
  gradient — so training sees the precision that is deployed; at the end the fp16-rounded values
  are written back, so the saved scales stay fp16-exact. Scales that are exactly zero (dead
  columns, dead rows) stay exactly zero.
* **Differentiable forward.** While training, every ``WaterSICLinear`` computes
  ``y = ((x ⊙ ste(g)) @ Cᵀ) ⊙ ste(t) + bias`` in fp32, where ``C`` is a float copy of the codes
  made inside the forward (from the codes decoded once per run and held in int8 — 1 byte per
  weight — or wider where a code needs it); it does not use the module's kernels.
  Each decoder block runs under :func:`torch.utils.checkpoint.checkpoint`, so the dense codes
  and the activations of one block at a time exist (they are recomputed in the backward pass).
* **Codes on the host.** On an accelerator the int8 codes (1 byte per weight, ~2.3× the packed
  model at 3.5 bits) are kept in pinned host memory when they would not fit comfortably beside
  the model (``FinetuneSettings.codes_on_host``, :func:`codes_belong_on_host`); each layer's
  codes are then copied to the device inside its forward, so device memory holds the packed
  model plus one layer's codes, whatever the model size.
* **Loss.** Token-level ``KL(teacher ‖ student)`` of the next-token distributions, averaged over
  tokens. The teacher is the float model; only its final hidden states (the input of the
  unquantized ``lm_head``) are kept, computed once, and both logit sets come from the student's
  own ``lm_head`` (shared: it is never quantized). The KL is computed in token chunks, each
  checkpointed, so a ``(tokens, vocab)`` logit matrix exists for one chunk at a time.
* **Optimiser.** AdamW (weight decay 0), gradient-norm clip 1.0, cosine decay of the learning rate
  from ``lr`` to ``lr · min_lr_ratio`` (default 1/100, the paper's 5e-4 → 5e-6) over the steps.
  One step accumulates the gradients of ``batch_size`` windows, one window at a time (memory).

Two ways in:

* inside ``from_pretrained(..., quantization_config=WaterSICConfig(finetune=True))`` the
  calibration engine keeps the float output of the last quantized block
  (``CalibrationResult.teacher_block_output``) and :func:`teacher_hidden_from_block_output` runs
  the model's tail (final norm etc.) on it;
* for a saved checkpoint, :func:`finetune_scales` takes the float model as ``teacher``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import StopForward

logger = logging.getLogger(__name__)

__all__ = [
    "CODES_DEVICE_SHARE",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FinetuneReport",
    "FinetuneSettings",
    "codes_belong_on_host",
    "default_finetune_steps",
    "finetune_after_calibration",
    "finetune_scales",
    "fp16_ste",
    "kl_divergence",
    "lm_head_inputs",
    "teacher_hidden_from_block_output",
]

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
# Default epochs over the windows when no step count is given: the paper's 10 on an accelerator;
# 2 on the CPU, where one epoch over 32 x 512 tokens of a 135M model already takes minutes.
DEFAULT_EPOCHS = {"cuda": 10, "cpu": 2}


@dataclass
class FinetuneSettings:
    """Settings of :func:`finetune_scales`.

    Attributes:
        steps (`int`, *optional*): optimiser steps; ``None`` = :func:`default_finetune_steps`.
        lr (`float`): peak learning rate (paper: 5e-4).
        batch_size (`int`): windows per optimiser step (gradients accumulated one window at a
            time); capped at the number of windows. Paper: 8.
        min_lr_ratio (`float`): the cosine schedule ends at ``lr · min_lr_ratio``.
        max_grad_norm (`float`): gradient-norm clip over all scales.
        seed (`int`): seed of the window order.
        chunk_tokens (`int`): tokens per checkpointed KL chunk (bounds the logit memory).
        device (`str`, *optional*): run on this device (the model is moved there and back);
            ``None`` keeps the model where it is.
        codes_on_host (`bool`, *optional*): keep the int8 codes in (pinned) host memory and
            copy each layer's codes to the device in its forward. ``None`` decides by memory
            (:func:`codes_belong_on_host`); no effect when the model runs on the CPU.
    """

    steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 8
    min_lr_ratio: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    chunk_tokens: int = 1024
    device: str | None = None
    codes_on_host: bool | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(
                self.steps, int) or self.steps < 1):
            raise ValueError(f"FinetuneSettings.steps must be an int >= 1 or None, got "
                             f"{self.steps!r}")
        for name in ("batch_size", "chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FinetuneSettings.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"FinetuneSettings.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(
                f"FinetuneSettings.min_lr_ratio must lie in (0, 1], got {self.min_lr_ratio!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(
                f"FinetuneSettings.max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.codes_on_host is not None and not isinstance(self.codes_on_host, bool):
            raise ValueError(f"FinetuneSettings.codes_on_host must be True, False or None, got "
                             f"{self.codes_on_host!r}")


@dataclass
class FinetuneReport:
    """Outcome of :func:`finetune_scales`.

    Attributes:
        kl_before (`float`): mean token KL(teacher ‖ student) over the windows before training,
            with the model's own (deployed) forward.
        kl_after (`float`): the same after the fp16 scales were written back.
        steps (`int`): optimiser steps taken.
        epochs (`float`): windows seen ÷ windows.
        windows (`int`): training windows.
        tokens (`int`): tokens in the windows.
        lr (`float`): peak learning rate.
        batch_size (`int`): windows per step.
        seconds (`float`): wall time, KL evaluations included.
        losses (`list[float]`): training loss (mean token KL of the step's windows) per step.
    """

    kl_before: float
    kl_after: float
    steps: int
    epochs: float
    windows: int
    tokens: int
    lr: float
    batch_size: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    def to_dict(self, *, losses: bool = False) -> dict[str, Any]:
        """JSON-able summary (for ``WaterSICConfig.finetune_report``); ``losses`` adds the curve."""
        out = asdict(self)
        if not losses:
            out.pop("losses")
        for key in ("kl_before", "kl_after", "epochs", "seconds"):
            out[key] = float(f"{out[key]:.6g}")
        return out


def default_finetune_steps(n_windows: int, batch_size: int, device: torch.device | str) -> int:
    """Steps for :data:`DEFAULT_EPOCHS` epochs (10 on CUDA, 2 on the CPU) of ``n_windows``
    windows in batches of ``batch_size``."""
    epochs = DEFAULT_EPOCHS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    per_epoch = math.ceil(n_windows / max(1, min(batch_size, n_windows)))
    return epochs * per_epoch


# ---------------------------------------------------------------------- fp16 straight-through
def _fp16_round(v: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``v`` clamped into the normal fp16 range (sign kept) and rounded to fp16, as fp32; entries
    where ``live`` is False are exactly 0. Shapes: ``v`` and ``live`` alike, any."""
    mag = v.abs().clamp(FP16_MIN_NORMAL, FP16_MAX)
    # sign(0) = 0 would turn a live scale that trained through zero into a dead one: keep it +.
    sign = torch.where(v < 0, -1.0, 1.0).to(v.dtype)
    return torch.where(live, sign * mag, torch.zeros_like(v)).half().float()


def fp16_ste(v: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Straight-through fp16 rounding: the forward value is :func:`_fp16_round` of ``v`` (what
    fp16 storage would hold), the gradient passes unchanged (zeroed where ``live`` is False).

    Args:
        v (`torch.Tensor`, fp32, any shape): trainable scales.
        live (`torch.BoolTensor`, same shape): False where the scale is fixed at zero.
    """
    rounded = _fp16_round(v.detach(), live)
    return torch.where(live, v + (rounded - v).detach(), rounded)


# ---------------------------------------------------------------------- differentiable layer
def _compact_codes(module: nn.Module) -> torch.Tensor:
    """The module's integer codes ``(out, in)`` in the narrowest integer dtype that holds them
    (int8 for almost every layer: 1 byte per weight). Decoded once per fine-tuning run, because
    the reference decoder of the packed format is far too slow to run in every forward."""
    codes = module.codes()
    peak = int(codes.abs().max()) if codes.numel() else 0
    dtype = torch.int8 if peak <= 127 else torch.int16 if peak <= 32767 else torch.int32
    return codes.to(dtype)


#: Share of the device's free memory the int8 codes may take before they are kept on the host.
CODES_DEVICE_SHARE = 0.5


def codes_belong_on_host(setting: bool | None, device: torch.device, code_bytes: int,
                         free_bytes: int | None) -> bool:
    """Whether WaterSIC-FT keeps the int8 codes on the host.

    Args:
        setting: ``FinetuneSettings.codes_on_host`` (``None`` = decide here).
        device: where the model runs.
        code_bytes (`int`): bytes of every layer's compact codes (1 per weight for int8).
        free_bytes (`int`, *optional*): free memory of ``device`` after the model is on it
            (``None``: unknown, e.g. the CPU).

    Returns:
        `False` on the CPU (host and device are one); else ``setting`` when given, else whether
        the codes exceed :data:`CODES_DEVICE_SHARE` of ``free_bytes`` (activations, gradients and
        the logits of a KL chunk need the rest).
    """
    if device.type == "cpu":
        return False
    if setting is not None:
        return setting
    return free_bytes is not None and code_bytes > CODES_DEVICE_SHARE * free_bytes


def _code_bytes(modules: Sequence[nn.Module]) -> int:
    """Bytes of the compact codes of ``modules`` (int8: one per weight; a layer with a code
    beyond ±127 takes 2 or 4, which the estimate ignores)."""
    return sum(m.out_features * m.in_features for m in modules)


def _free_memory(device: torch.device) -> int | None:
    """Free bytes of an accelerator, ``None`` where torch cannot tell."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


class _ScaleState:
    """One layer's trainable scales and which entries are fixed at zero.

    The scales are trained as fp32 factors on the stored values: ``t = t₀ ⊙ u``, ``g = g₀ ⊙ v``
    with ``u = v = 1`` at the start. The stored column scale holds the step sizes ``α`` (small,
    different per layer), which the paper keeps in the frozen ``Zα`` with its ``t``, ``g`` near 1;
    training factors near 1 gives its learning rate (5e-4) the same relative meaning.
    """

    def __init__(self, module: nn.Module, codes_on_host: bool = False) -> None:
        self.module = module
        self.row0 = module.weight_row_scale.detach().float().clone()  # (out,)
        self.col0 = module.weight_col_scale.detach().float().clone()  # (in,)
        self.row = nn.Parameter(torch.ones_like(self.row0))  # u, (out,)
        self.col = nn.Parameter(torch.ones_like(self.col0))  # v, (in,)
        self.row_live = module.weight_row_scale.detach() != 0
        self.col_live = module.weight_col_scale.detach() != 0
        codes = _compact_codes(module)  # (out, in), integer, on the module's device
        if codes_on_host:
            # pinned, so the copy in every forward is an asynchronous DMA
            codes = codes.cpu().pin_memory() if torch.cuda.is_available() else codes.cpu()
        self.codes = codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``((x ⊙ ste(g)) @ Cᵀ) ⊙ ste(t) + bias``; ``x`` ``(..., in)`` → ``(..., out)`` in
        ``x.dtype``, computed in fp32 like the module's own kernels."""
        m = self.module
        if x.shape[-1] != m.in_features:
            raise ValueError(f"input has {x.shape[-1]} features; this layer expects "
                             f"{m.in_features}")
        g = fp16_ste(self.col0 * self.col, self.col_live)
        t = fp16_ste(self.row0 * self.row, self.row_live)
        # The fp32 codes exist only inside this forward (and its recomputation in backward);
        # codes held on the host come to the device here, one layer at a time.
        codes = self.codes.to(x.device, non_blocking=True)
        y = ((x.float() * g) @ codes.float().t()) * t
        if m.bias is not None:
            y = y + m.bias.float()
        return y.to(x.dtype)

    def write_back(self) -> None:
        """Store the fp16-rounded trained values in the module's fp16 parameters."""
        with torch.no_grad():
            row, col = self.row0 * self.row, self.col0 * self.col
            self.module.weight_row_scale.copy_(_fp16_round(row, self.row_live).half())
            self.module.weight_col_scale.copy_(_fp16_round(col, self.col_live).half())


def _quantized_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder-block list of a quantized model: the outermost ``nn.ModuleList`` holding a
    ``WaterSICLinear`` (:func:`~watersic_hf.integration.blocks.find_decoder_blocks` wants
    ``nn.Linear`` layers, which a quantized model no longer has)."""
    from ..nn import WaterSICLinear

    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
                isinstance(m, WaterSICLinear) for m in module.modules()):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder blocks with WaterSICLinear layers")


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def _training_mode(model: nn.Module, states: list[_ScaleState]) -> Iterator[None]:
    """Swap in the differentiable forward of every layer and the checkpointed blocks; freeze the
    rest of the model. Everything is restored on exit, also after an error."""
    flags = {p: p.requires_grad for p in model.parameters()}
    blocks = _quantized_blocks(model)
    try:
        for p in flags:
            p.requires_grad_(False)
        for s in states:
            s.module.forward = s.forward  # instance attribute shadows the class method
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        for s in states:
            s.module.__dict__.pop("forward", None)
        for p, flag in flags.items():
            p.requires_grad_(flag)


# ---------------------------------------------------------------------- teacher and logits
def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``(..., vocab)`` from final hidden states ``(..., hidden)``: the output
    embedding plus the logit transforms of the model's config (Cohere ``logit_scale``, Granite
    ``logits_scaling``, Gemma ``final_logit_softcapping``)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype)).float()
    cfg = _text_config(model)
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextlib.contextmanager
def _capture_head_input(model: nn.Module, stop: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record the input of the output embedding (and stop the forward there when ``stop``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head); WaterSIC-FT "
                         "needs a causal LM")
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0])
        if stop:
            raise StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def lm_head_inputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``(B, T, hidden)`` the model feeds its ``lm_head`` for token ids
    ``(B, T)`` (the model's forward stops there, so no logits are computed)."""
    device = model.get_output_embeddings().weight.device
    with _capture_head_input(model) as got:
        try:
            model(input_ids=ids.to(device), use_cache=False)
        except StopForward:
            pass
    if not got:
        raise ValueError(f"{type(model).__name__}.forward never called its lm_head")
    return got[0]


@torch.no_grad()
def teacher_hidden_from_block_output(
    model: nn.Module, windows: Sequence[torch.Tensor], block_outputs: Sequence[torch.Tensor],
    block_index: int,
) -> list[torch.Tensor]:
    """Teacher final hidden states from the float output of decoder block ``block_index``.

    Runs ``model`` on each window with that block's output replaced by the float one, so what
    follows it (float blocks after it, the final norm, a projection) is the model's own code.

    Args:
        windows: per batch, token ids ``(B, T)``.
        block_outputs: per batch, the float block output ``(B, T, hidden)``.
        block_index (`int`): index of that block in the decoder stack.

    Returns:
        per batch, ``(B, T, hidden)`` on the CPU, in the dtype of the block outputs.
    """
    blocks = _quantized_blocks(model)
    block = blocks[block_index]
    out: list[torch.Tensor] = []
    replacement: list[torch.Tensor] = []

    def replace(_m: nn.Module, _args: Any, output: Any) -> Any:
        new = replacement[0].to(device=_hidden(output).device, dtype=_hidden(output).dtype)
        if isinstance(output, torch.Tensor):
            return new
        return (new, *tuple(output)[1:])

    handle = block.register_forward_hook(replace)
    try:
        for ids, h in zip(windows, block_outputs, strict=True):
            replacement[:] = [h]
            out.append(lm_head_inputs(model, ids).detach().to("cpu", h.dtype))
    finally:
        handle.remove()
    return out


def _hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def kl_divergence(model: nn.Module, student: torch.Tensor, teacher: torch.Tensor,
                  chunk_tokens: int) -> torch.Tensor:
    """Summed token KL(teacher ‖ student) of the next-token distributions.

    Args:
        student (`torch.Tensor` of shape `(..., hidden)`): student lm_head inputs (with grad).
        teacher (`torch.Tensor` of the same shape): teacher lm_head inputs.
        chunk_tokens (`int`): tokens per checkpointed chunk.

    Returns:
        a 0-dim fp32 tensor: the sum over tokens (divide by the token count for the mean).
    """
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).to(s.device)

    def chunk(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        log_t = torch.log_softmax(head_logits(model, ht), dim=-1)
        log_s = torch.log_softmax(head_logits(model, hs), dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum()

    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_tokens):
        hs, ht = s[i:i + chunk_tokens], t[i:i + chunk_tokens]
        total = total + (checkpoint(chunk, hs, ht, use_reentrant=False) if hs.requires_grad
                         else chunk(hs, ht))
    return total


# ---------------------------------------------------------------------- main entry
def _as_windows(windows: Any) -> list[torch.Tensor]:
    if isinstance(windows, torch.Tensor):
        windows = [windows] if windows.dim() == 2 else list(windows)
    out = []
    for w in windows:
        w = torch.as_tensor(w)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"windows must be token-id tensors (T,) or (B, T); got "
                             f"{w.dtype} {tuple(w.shape)}")
        out.extend(w.long())  # one (T,) row per window
    if not out:
        raise ValueError("windows is empty: give at least one token window")
    return out


def _teacher_rows(teacher: Any, model: nn.Module, windows: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
    """Per window, the teacher's lm_head input ``(T, hidden)`` on the CPU."""
    if isinstance(teacher, nn.Module):
        with torch.no_grad():
            return [lm_head_inputs(teacher, w[None])[0].detach().cpu() for w in windows]
    if isinstance(teacher, torch.Tensor):
        teacher = [teacher] if teacher.dim() == 2 else list(teacher)
    rows: list[torch.Tensor] = []
    for h in teacher:
        rows.extend([h] if h.dim() == 2 else list(h))
    if len(rows) != len(windows) or any(r.shape[0] != w.shape[0] for r, w in
                                        zip(rows, windows, strict=False)):
        raise ValueError(
            f"teacher hidden states ({len(rows)} windows) do not match the {len(windows)} token "
            "windows; give one (T, hidden) tensor per window, in the same order")
    return rows


def _mean_kl(model: nn.Module, windows: list[torch.Tensor], teacher: list[torch.Tensor],
             chunk_tokens: int) -> float:
    """Mean token KL over ``windows`` with the model's current forward (no gradients)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, th in zip(windows, teacher, strict=True):
            hs = lm_head_inputs(model, ids[None])[0]
            total += float(kl_divergence(model, hs, th, chunk_tokens))
            tokens += ids.numel()
    return total / max(tokens, 1)


def finetune_scales(
    model: nn.Module,
    windows: Any,
    teacher: Any,
    settings: FinetuneSettings | None = None,
) -> FinetuneReport:
    """Fine-tune the fp16 row/column scales of every ``WaterSICLinear`` of ``model`` in place.

    Args:
        model (`PreTrainedModel`): a WaterSIC-quantized causal LM (just calibrated, or loaded
            from a saved folder); nothing may be offloaded.
        windows: token ids: a ``(N, T)`` tensor, or a list of ``(T,)`` / ``(B, T)`` tensors.
        teacher: the float model (same architecture and vocabulary), or its precomputed
            lm_head inputs: one ``(T, hidden)`` (or ``(B, T, hidden)``) tensor per window entry,
            in the order of ``windows``.
        settings (`FinetuneSettings`, *optional*): steps, learning rate, batch, ...

    Returns:
        [`FinetuneReport`] with the KL before and after.

    Raises:
        ValueError: no ``WaterSICLinear`` in the model, bad windows, mismatched teacher.
    """
    from ..nn import WaterSICLinear

    settings = settings or FinetuneSettings()
    start = time.perf_counter()
    layers = [m for m in model.modules() if isinstance(m, WaterSICLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no WaterSICLinear: quantize it first "
                         "(WaterSICConfig) or load a saved WaterSIC checkpoint")
    rows = _as_windows(windows)
    teacher_rows = _teacher_rows(teacher, model, rows)
    home = next(model.parameters()).device
    device = torch.device(settings.device) if settings.device else home
    batch = min(settings.batch_size, len(rows))
    steps = settings.steps or default_finetune_steps(len(rows), batch, device)
    was_training = model.training
    model.eval()  # dropout off: the student must be the deployed function
    if device != home:
        model.to(device)
    try:
        kl_before = _mean_kl(model, rows, teacher_rows, settings.chunk_tokens)
        code_bytes = _code_bytes(layers)
        on_host = codes_belong_on_host(settings.codes_on_host, device, code_bytes,
                                       _free_memory(device))
        if on_host:
            logger.info("WaterSIC-FT: the int8 codes (%.2f GB) are kept in host memory and copied "
                        "to %s one layer at a time", code_bytes / 1e9, device)
        states = [_ScaleState(m, on_host) for m in layers]
        params = [p for s in states for p in (s.row, s.col)]
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        floor = settings.min_lr_ratio

        def lr_factor(step: int) -> float:
            # cosine from 1 at step 0 to `floor` at the last step
            progress = step / max(steps - 1, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen = torch.Generator().manual_seed(settings.seed)
        order: list[int] = []
        losses: list[float] = []
        seen = 0
        with _training_mode(model, states):
            for _ in range(steps):
                picks = []
                for _ in range(batch):
                    if not order:
                        order = torch.randperm(len(rows), generator=gen).tolist()
                    picks.append(order.pop())
                tokens = sum(rows[i].numel() for i in picks)
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for i in picks:
                    hs = lm_head_inputs(model, rows[i][None])[0]
                    loss = kl_divergence(model, hs, teacher_rows[i], settings.chunk_tokens) / tokens
                    loss.backward()
                    step_loss += float(loss.detach())
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"WaterSIC-FT: the KL became {step_loss} at step {len(losses)}; lower "
                        f"the learning rate (lr={settings.lr})")
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                lr_now = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                losses.append(step_loss)
                seen += len(picks)
                if len(losses) % max(1, steps // 10) == 0 or len(losses) == steps:
                    logger.info("WaterSIC-FT step %d/%d: KL %.5f, lr %.3g", len(losses), steps,
                                step_loss, lr_now)
        for s in states:
            s.write_back()
        kl_after = _mean_kl(model, rows, teacher_rows, settings.chunk_tokens)
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
    report = FinetuneReport(
        kl_before=kl_before, kl_after=kl_after, steps=steps, epochs=seen / len(rows),
        windows=len(rows), tokens=sum(r.numel() for r in rows), lr=settings.lr,
        batch_size=batch, seconds=time.perf_counter() - start, losses=losses,
    )
    logger.info("WaterSIC-FT: KL %.5f -> %.5f in %d steps (%.1fs)", kl_before, kl_after, steps,
                report.seconds)
    return report


def finetune_after_calibration(model: nn.Module, config: Any, result: Any) -> FinetuneReport:
    """WaterSIC-FT inside ``from_pretrained``: fine-tune the just-calibrated ``model`` against the
    float outputs the calibration kept (``result.teacher_block_output``).

    The model is moved to the calibration device (``config.device``, else CUDA when available)
    for the fine-tuning and back afterwards; the step count used is written to
    ``config.finetune_steps``.

    Args:
        model (`PreTrainedModel`): the model :func:`calibrate_model` has just quantized.
        config (`WaterSICConfig`): with ``finetune=True``.
        result (`CalibrationResult`): the calibration's result, with the teacher outputs.
    """
    from .engine.executor import has_offloaded_parameters

    if result.teacher_block_output is None or result.windows is None:
        raise ValueError("the calibration kept no teacher outputs; calibrate with "
                         "WaterSICConfig(method='watersic', finetune=True)")
    if has_offloaded_parameters(model):
        raise ValueError("finetune=True needs the whole model in memory, but parts of it are "
                         "offloaded (device_map with 'disk'); fine-tune the saved checkpoint "
                         "on a larger machine with watersic_hf.finetune_scales")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home = next(model.parameters()).device
    rows = [w for batch in result.windows for w in batch]
    batch = min(config.finetune_batch_size, len(rows))
    steps = config.finetune_steps or default_finetune_steps(len(rows), batch, device)
    settings = FinetuneSettings(steps=steps, lr=config.finetune_lr, batch_size=batch,
                                seed=config.seed)
    model.to(device)
    try:
        teacher = teacher_hidden_from_block_output(
            model, result.windows, result.teacher_block_output, result.teacher_block_index)
        result.teacher_block_output = None  # the block outputs are not needed any more
        report = finetune_scales(model, rows, teacher, settings)
    finally:
        model.to(home)
    config.finetune_steps = steps
    return report
