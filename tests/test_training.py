"""Training through WaterSICLinear: the autograd formula of the packed op, and QLoRA-style LoRA.

The gradients of every backend (torch twin, numba CPU kernels, Triton under its interpreter) and
of the plain format are compared with autograd through a dense fp64 reference; the LoRA tests
quantize a tiny Llama, train adapters with `transformers.Trainer` and reload them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from watersic_hf._numba import HAS_NUMBA
from watersic_hf._triton import HAS_TRITON, interpreter_enabled
from watersic_hf.nn import WaterSICLinear

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreter_enabled()),
    reason="needs Triton with a GPU or TRITON_INTERPRET=1",
)
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="needs numba (the CPU kernels)")

# (format, backend) pairs: every forward implementation the layer can run
PATHS = [
    pytest.param("plain", "torch", id="plain"),
    pytest.param("packed", "torch", id="packed-torch"),
    pytest.param("packed", "cpu", id="packed-cpu", marks=needs_numba),
    pytest.param("packed", "triton", id="packed-triton", marks=needs_triton),
]


def fake_qw(out_f: int, in_f: int, *, seed: int) -> SimpleNamespace:
    """QuantizedWeight-like codes with wide per-column spreads (so the packer uses escapes)
    and fp16-exact scales."""
    gen = torch.Generator().manual_seed(seed)
    spread = 3.0 * torch.exp(0.9 * torch.randn(in_f, generator=gen))
    codes = (torch.randn(out_f, in_f, generator=gen) * spread).round().to(torch.int32)
    col_scale = (torch.rand(in_f, generator=gen) * 0.01 + 1e-3).half().float()
    row_scale = (torch.rand(out_f, generator=gen) + 0.5).half().float()
    return SimpleNamespace(codes=codes, col_scale=col_scale, row_scale=row_scale)


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _layer(fmt: str, backend: str, *, has_bias: bool, scale_dtype: torch.dtype,
           seed: int = 0) -> tuple[WaterSICLinear, SimpleNamespace]:
    qw = fake_qw(37, 70, seed=seed)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(seed + 1)) if has_bias else None
    m = WaterSICLinear.from_quantized(qw, bias, format=fmt, backend=backend).to(_device(backend))
    if scale_dtype != torch.float16:
        # what scale fine-tuning does: the scales become trainable tensors of another dtype
        for name in ("weight_col_scale", "weight_row_scale"):
            setattr(m, name, nn.Parameter(getattr(m, name).to(scale_dtype), requires_grad=False))
    return m, qw


def _dense_grads(qw: SimpleNamespace, x: torch.Tensor, bias: torch.Tensor | None,
                 w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd of ``sum(w · y)`` through the dense fp64 formula, w.r.t. x, scales and bias."""
    leaves = {
        "x": x.detach().double().requires_grad_(True),
        "col": qw.col_scale.double().requires_grad_(True),
        "row": qw.row_scale.double().requires_grad_(True),
    }
    if bias is not None:
        leaves["bias"] = bias.detach().double().requires_grad_(True)
    weight = leaves["row"][:, None] * qw.codes.double() * leaves["col"][None, :]
    y = leaves["x"] @ weight.t()
    if bias is not None:
        y = y + leaves["bias"]
    (y * w.double()).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("fmt,backend", PATHS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_dense_fp64_reference(fmt, backend, scale_dtype, has_bias):
    m, qw = _layer(fmt, backend, has_bias=has_bias, scale_dtype=scale_dtype)
    dev = m.weight_col_scale.device
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 70, generator=gen).to(dev).requires_grad_(True)
    w = torch.randn(2, 3, 37, generator=gen).to(dev)
    wanted = {"x": x, "col": m.weight_col_scale, "row": m.weight_row_scale}
    if has_bias:
        wanted["bias"] = m.bias
    for t in wanted.values():
        t.requires_grad_(True)
    y = m(x)
    got = dict(zip(wanted, torch.autograd.grad((y * w).sum(), list(wanted.values())), strict=True))
    ref = _dense_grads(qw, x.cpu(), m.bias.cpu() if has_bias else None, w.cpu())
    assert set(got) == set(ref)
    for name, g in got.items():
        assert g.dtype == wanted[name].dtype, f"grad of {name} is {g.dtype}"
        assert g.shape == wanted[name].shape
        # fp16 scale gradients carry fp16 rounding (2^-11 relative); the rest fp32 sums
        tol = 2e-3 if g.dtype == torch.float16 else 2e-5
        torch.testing.assert_close(g.cpu().double(), ref[name], rtol=tol, atol=tol * ref[name]
                                   .abs().max().item(), msg=lambda s, n=name: f"{n}: {s}")
    # the integer code tensors never take part in autograd
    for name, p in m.named_parameters():
        if not p.dtype.is_floating_point:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("fmt,backend", PATHS)
def test_scale_gradients_without_input_gradient(fmt, backend):
    # x not requiring grad (the first layer of a model) must still reach the op's autograd
    # formula, not the CPU fast path that only serves calls with nothing to differentiate
    m, qw = _layer(fmt, backend, has_bias=True, scale_dtype=torch.float32, seed=4)
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(5)).to(m.bias.device)
    m.weight_col_scale.requires_grad_(True)
    y = m(x)
    assert y.requires_grad
    y.square().sum().backward()
    assert m.weight_col_scale.grad is not None and m.weight_col_scale.grad.dtype == torch.float32
    assert m.weight_row_scale.grad is None and m.bias.grad is None
    ref_y = qw.row_scale.double() * ((x.cpu().double() * qw.col_scale.double())
                                    @ qw.codes.double().t()) + m.bias.detach().cpu().double()
    ref = _dense_grads(qw, x.cpu(), m.bias.detach().cpu(), 2 * ref_y)["col"]
    torch.testing.assert_close(m.weight_col_scale.grad.cpu().double(), ref, rtol=1e-4,
                               atol=1e-4 * ref.abs().max().item())


def test_packed_and_plain_gradients_are_equal():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 70, generator=gen)
    grads = []
    for fmt in ("packed", "plain"):
        m, _ = _layer(fmt, "torch", has_bias=True, scale_dtype=torch.float32, seed=6)
        xi = x.clone().requires_grad_(True)
        params = [xi, m.weight_col_scale, m.weight_row_scale, m.bias]
        for p in params:
            p.requires_grad_(True)
        grads.append(torch.autograd.grad(m(xi).sin().sum(), params))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_frozen_layer_passes_input_gradients_only():
    # the LoRA setting: the quantized layer is frozen, the activations carry gradients
    m, qw = _layer("packed", "torch", has_bias=True, scale_dtype=torch.float16, seed=8)
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.randn(3, 70, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in m.parameters())
    ref = _dense_grads(qw, x, m.bias, torch.ones(3, 37))["x"]
    torch.testing.assert_close(x.grad.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
