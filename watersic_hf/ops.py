"""Dispatch between the fused kernels and their plain-torch twins.

Every kernel (``triton_<op>`` in ``watersic_hf.kernels`` for CUDA, ``cpu_<op>`` in
``watersic_hf.cpu_kernels`` for CPU) has a ``torch_<op>`` twin here with the same signature: the
twin is the test oracle. ``resolve_backend`` turns the user's choice (``"auto"``, ``"torch"``,
``"triton"``, ``"cpu"``, overridable with the environment variable ``WATERSIC_BACKEND``) into the
backend that actually runs.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import torch

from . import packing
from ._numba import HAS_NUMBA, require_numba
from ._triton import HAS_TRITON, interpreter_enabled

__all__ = [
    "Backend",
    "packed_linear",
    "resolve_backend",
    "torch_packed_matmul",
    "torch_plain_matmul",
]


class Backend(str, enum.Enum):
    """Which implementation runs a WaterSIC matmul.

    * ``AUTO``: Triton on CUDA tensors when Triton is installed, the numba kernels on CPU
      tensors when numba is installed, torch otherwise.
    * ``TORCH``: the plain-torch reference (unpack the whole matrix, then ``torch.matmul`` in
      fp32); slow, kept as the test oracle.
    * ``TRITON``: the fused Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1``
      (Triton's interpreter; slow, meant for tests).
    * ``CPU``: the numba kernels of ``watersic_hf.cpu_kernels`` (fused decode-GEMV for up to
      16 rows, tile decode + BLAS above); CPU tensors only.
    """

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    CPU = "cpu"


def _parse_backend(value: str | Backend, source: str) -> Backend:
    try:
        return Backend(str(value.value if isinstance(value, Backend) else value).lower())
    except ValueError:
        raise ValueError(
            f"{source}={value!r} is not a backend; use one of 'auto', 'torch', 'triton', 'cpu'."
        ) from None


# what "auto" picks per device type (Triton and numba availability do not change at runtime)
_AUTO = {
    "cuda": Backend.TRITON if HAS_TRITON else Backend.TORCH,
    "cpu": Backend.CPU if HAS_NUMBA else Backend.TORCH,
}


def resolve_backend(requested: str | Backend, device: torch.device) -> Backend:
    """Pick the backend that runs on ``device``.

    Args:
        requested (`str` or `Backend`): the module's setting. The environment variable
            ``WATERSIC_BACKEND`` (``auto`` / ``torch`` / ``triton`` / ``cpu``) overrides it, and
            ``WATERSIC_FORCE_TORCH=1`` forces ``torch`` everywhere.
        device (`torch.device`): where the activations live.

    Returns:
        `Backend`: ``Backend.TORCH``, ``Backend.TRITON`` or ``Backend.CPU``.

    Raises:
        ImportError: ``triton`` (``cpu``) was asked for but Triton (numba) is not installed.
        RuntimeError: ``triton`` was asked for on CPU tensors without ``TRITON_INTERPRET=1``,
            or ``cpu`` on tensors that are not on the CPU.
    """
    if os.environ.get("WATERSIC_FORCE_TORCH", "0") == "1":
        return Backend.TORCH
    env = os.environ.get("WATERSIC_BACKEND")
    if not env and (requested is Backend.AUTO or requested == "auto"):
        # the common case, once per layer call: no parsing, no checks that cannot fail
        return _AUTO.get(device.type, Backend.TORCH)
    if env:
        choice = _parse_backend(env, "WATERSIC_BACKEND")
    else:
        choice = _parse_backend(requested, "backend")
    if choice is Backend.AUTO:
        return _AUTO.get(device.type, Backend.TORCH)
    if choice is Backend.CPU:
        require_numba()
        if device.type != "cpu":
            raise RuntimeError(
                f"backend='cpu' runs on CPU tensors only; these are on {device.type}. Use "
                "backend='auto'."
            )
    if choice is Backend.TRITON:
        if not HAS_TRITON:
            raise ImportError(
                "backend='triton' needs Triton: `pip install watersic-hf[triton]`, "
                "or use backend='torch'."
            )
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing watersic_hf, or use backend='torch'."
            )
    return choice


def torch_plain_matmul(
    x: torch.Tensor,  # (..., K) float
    codes: torch.Tensor,  # (N, K) int32
    col_scale: torch.Tensor,  # (K,) fp16 or fp32
    row_scale: torch.Tensor,  # (N,) fp16 or fp32
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` from unpacked int32 codes.

    Plain torch, hence differentiable in ``x``, the scales (fp16 or fp32) and ``bias``, with
    the same gradients as the packed op's autograd formula. All arithmetic is fp32 (codes up
    to 2²⁴ are exact there; fp16 would not hold codes above 2048 exactly); the result is cast
    back to ``x.dtype``.

    Returns:
        `torch.Tensor` of shape `(..., N)` and dtype ``x.dtype``.
    """
    xs = x.float() * col_scale.float()
    y = torch.matmul(xs, codes.float().t()) * row_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def torch_packed_matmul(
    x: torch.Tensor,  # (M, K) float
    packed: torch.Tensor,  # (W, N) int32
    group_meta: torch.Tensor,  # (NG, 8) int32
    perm: torch.Tensor,  # (K,) int32
    escape_packed: torch.Tensor,  # (WE,) int32
    escape_base: torch.Tensor,  # (NGE, NC) int32
    col_scale: torch.Tensor,  # (K,) fp16
    row_scale: torch.Tensor,  # (N,) fp16
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """Reference twin of ``watersic_hf.kernels.triton_packed_matmul``: decode, then matmul.

    Decodes the packed codes with `packing.unpack_codes` and applies `torch_plain_matmul`
    (fp32 arithmetic).

    Returns:
        `torch.Tensor` of shape `(M, N)` and dtype ``x.dtype``.
    """
    codes = _unpack(packed, group_meta, perm, escape_packed, escape_base)
    return torch_plain_matmul(x, codes, col_scale, row_scale, bias)


def _unpack(packed: torch.Tensor, group_meta: torch.Tensor, perm: torch.Tensor,
            escape_packed: torch.Tensor, escape_base: torch.Tensor) -> torch.Tensor:
    """The int32 codes, shape ``(N, K)``, of the op's code tensors (reference decoder)."""
    tensors = {
        "weight_packed": packed,
        "weight_group_meta": group_meta,
        "weight_perm": perm,
        "weight_escape_packed": escape_packed,
        "weight_escape_base": escape_base,
    }
    return packing.unpack_codes(tensors, perm.shape[0], packed.shape[1])


@torch.library.custom_op("watersic::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_meta: torch.Tensor,
    perm: torch.Tensor,
    escape_packed: torch.Tensor,
    escape_base: torch.Tensor,
    col_scale: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    args = (x, packed, group_meta, perm, escape_packed, escape_base, col_scale, row_scale, bias)
    if backend == Backend.TRITON.value:
        from .kernels import triton_packed_matmul

        # the Triton kernel loads the scales through typed pointers and converts them to fp32,
        # so fp16 and fp32 scales both work as they are
        return triton_packed_matmul(*args)
    if backend == Backend.CPU.value:
        return _cpu_matmul_any_scale(_CPU_MATMUL or _load_cpu_matmul(), *args)
    return torch_packed_matmul(*args)


@_packed_linear_op.register_fake
def _(x, packed, group_meta, perm, escape_packed, escape_base, col_scale, row_scale, bias, backend):
    return x.new_empty(x.shape[0], packed.shape[1])


# ---------------------------------------------------------------------------------- autograd
# Indices of the op's differentiable inputs; the five code tensors and ``backend`` never get a
# gradient (the codes are integers, frozen by construction).
_X, _COL, _ROW, _BIAS = 0, 6, 7, 8


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, packed, group_meta, perm, escape_packed, escape_base, col_scale, row_scale, bias, _ = inputs
    # x is only read by the scale gradients: not keeping it saves one activation per layer in
    # the usual LoRA setup (frozen scales)
    keep_x = col_scale.requires_grad or row_scale.requires_grad
    ctx.save_for_backward(
        x if keep_x else None, packed, group_meta, perm, escape_packed, escape_base, col_scale,
        row_scale,
    )
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``y = row_scale · ((x · col_scale) @ Cᵀ) + bias`` (``grad``: `(M, N)`).

    * ``grad_x = ((grad · row_scale) @ C) · col_scale``, `(M, K)`;
    * ``grad_col_scale = Σ_m x · ((grad · row_scale) @ C)``, `(K,)`;
    * ``grad_row_scale = Σ_m grad · ((x · col_scale) @ Cᵀ)``, `(N,)`;
    * ``grad_bias = Σ_m grad``, `(N,)`.

    Arithmetic is fp32 like the forward (codes are exact there); each gradient is returned in
    the dtype of its input, so fp32 scales being fine-tuned get fp32 gradients. The codes are
    decoded with the reference decoder `packing.unpack_codes` (plain torch, any device): a
    transient `(N, K)` matrix per layer and backward call.
    """
    x, packed, group_meta, perm, escape_packed, escape_base, col_scale, row_scale = (
        ctx.saved_tensors
    )
    needs = ctx.needs_input_grad
    grads: list[torch.Tensor | None] = [None] * 10
    if not (needs[_X] or needs[_COL] or needs[_ROW] or needs[_BIAS]):
        return tuple(grads)
    g = grad.float()
    if needs[_BIAS]:
        grads[_BIAS] = g.sum(0).to(ctx.bias_dtype)
    if needs[_X] or needs[_COL] or needs[_ROW]:
        codes = _unpack(packed, group_meta, perm, escape_packed, escape_base).float()  # (N, K)
        cs, rs = col_scale.float(), row_scale.float()
        if needs[_X] or needs[_COL]:
            gc = torch.matmul(g * rs, codes)  # (M, K): gradient w.r.t. x · col_scale
            if needs[_X]:
                grads[_X] = (gc * cs).to(ctx.x_dtype)
            if needs[_COL]:
                grads[_COL] = (gc * x.float()).sum(0).to(col_scale.dtype)
        if needs[_ROW]:
            z = torch.matmul(x.float() * cs, codes.t())  # (M, N): the output before row_scale
            grads[_ROW] = (g * z).sum(0).to(row_scale.dtype)
    return tuple(grads)


_packed_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _cpu_matmul_any_scale(
    cpu_matmul: Any,
    x: torch.Tensor,  # (M, K) float
    packed: torch.Tensor,  # (W, N) int32
    group_meta: torch.Tensor,  # (NG, 8) int32
    perm: torch.Tensor,  # (K,) int32
    escape_packed: torch.Tensor,  # (WE,) int32
    escape_base: torch.Tensor,  # (NGE, NC) int32
    col_scale: torch.Tensor,  # (K,) fp16 or another float dtype
    row_scale: torch.Tensor,  # (N,) fp16 or another float dtype
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """`cpu_kernels.cpu_packed_matmul` for scales of any float dtype.

    The numba kernels read the scales as fp16 bit patterns. Scales in another dtype (fp32
    scales being fine-tuned) are applied in fp32 torch around a kernel call with unit fp16
    scales and no bias, in the order `torch_plain_matmul` uses, so the result is the same.

    Returns:
        `torch.Tensor` of shape `(M, N)` and dtype ``x.dtype``.
    """
    if col_scale.dtype == torch.float16 and row_scale.dtype == torch.float16:
        return cpu_matmul(x, packed, group_meta, perm, escape_packed, escape_base, col_scale,
                          row_scale, bias)
    ones_k = torch.ones(perm.shape[0], dtype=torch.float16)
    ones_n = torch.ones(packed.shape[1], dtype=torch.float16)
    xs = x.float() * col_scale.float()
    y = cpu_matmul(xs, packed, group_meta, perm, escape_packed, escape_base, ones_k, ones_n,
                   None) * row_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_linear(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    col_scale: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str | Backend = Backend.AUTO,
) -> torch.Tensor:
    """``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` from the packed format.

    Runs the custom op ``torch.ops.watersic.packed_linear`` (traceable by
    ``torch.compile(fullgraph=True)`` through its fake implementation), which calls the Triton
    kernels, the numba CPU kernels or the torch twin according to `resolve_backend`.

    Args:
        x (`torch.Tensor` of shape `(..., K)`): activations, any float dtype.
        tensors (`dict[str, torch.Tensor]`): the code tensors of `packing.CODE_TENSOR_NAMES`.
        col_scale (`torch.Tensor` of shape `(K,)`): per-column scale, float16 (as stored) or
            another float dtype (e.g. fp32 scales being fine-tuned).
        row_scale (`torch.Tensor` of shape `(N,)`): per-row scale, same dtypes as
            ``col_scale``.
        bias (`torch.Tensor` of shape `(N,)`, *optional*): bias.
        backend (`str` or `Backend`, *optional*, defaults to ``"auto"``).

    Differentiable in ``x``, both scales and ``bias`` (the op's autograd formula, on every
    backend); the codes never get gradients.

    Returns:
        `torch.Tensor` of shape `(..., N)` and dtype ``x.dtype``.
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"x has dtype {x.dtype}; WaterSICLinear needs floating-point activations.")
    chosen = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    args = (
        x if x.dim() == 2 else x.reshape(-1, x.shape[-1]),
        tensors["weight_packed"],
        tensors["weight_group_meta"],
        tensors["weight_perm"],
        tensors["weight_escape_packed"],
        tensors["weight_escape_base"],
        col_scale,
        row_scale,
        bias,
    )
    if (
        chosen is Backend.CPU
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and _any_requires_grad(x, col_scale, row_scale, bias))
    ):
        # eager CPU calls skip the custom op's dispatcher (measured: ~30 µs of a ~100 µs
        # per-layer budget when decoding a small model); compiled graphs and autograd (a
        # gradient wanted for x, a scale or the bias) still see the op
        y = _cpu_matmul_any_scale(_CPU_MATMUL or _load_cpu_matmul(), *args)
    else:
        y = _packed_linear_op(*args, chosen.value)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def _any_requires_grad(
    x: torch.Tensor, col_scale: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    return (
        x.requires_grad
        or col_scale.requires_grad
        or row_scale.requires_grad
        or (bias is not None and bias.requires_grad)
    )


_CPU_MATMUL = None


def _load_cpu_matmul():
    """``cpu_kernels.cpu_packed_matmul``, imported on first use (``import numba`` takes ~0.5 s)."""
    global _CPU_MATMUL
    from .cpu_kernels import cpu_packed_matmul

    _CPU_MATMUL = cpu_packed_matmul
    return cpu_packed_matmul
