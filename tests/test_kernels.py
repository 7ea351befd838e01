"""Triton kernels against their torch twins (Triton's interpreter on CPU, the GPU when present)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from watersic_hf import ops, packing
from watersic_hf._triton import HAS_TRITON, interpreter_enabled

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreter_enabled()),
    reason="needs Triton with a GPU or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol relative to the output's RMS, rtol, SQNR floor in dB) per activation dtype: fp16 rounds
# x·col_scale to 11 bits before the tensor-core dot; bf16 outputs are rounded to 8 bits
TOL = {torch.float32: (1e-4, 1e-4, 100.0), torch.float16: (4e-3, 4e-3, 55.0),
       torch.bfloat16: (3e-2, 3e-2, 38.0)}


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """20·log10(‖ref‖ / ‖ref − out‖) (torchao's compute_error)."""
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-300)))


def make_layer(n: int, k: int, *, seed: int = 0, outlier: float = 6000.0):
    """Packed codes with per-column spreads, an outlier column, zero columns and escapes."""
    gen = torch.Generator().manual_seed(seed)
    col = 2.5 * torch.exp(0.7 * torch.randn(k, generator=gen))
    codes = (torch.randn(n, k, generator=gen) * col).round().to(torch.int32)
    codes[:, k // 3] = (torch.randn(n, generator=gen) * outlier).round().int()
    if k > 4:
        codes[:, 1] = 0
    packed = packing.pack_codes(codes)
    col_scale = (torch.rand(k, generator=gen) * 0.02 + 1e-3).half()
    row_scale = (torch.rand(n, generator=gen) + 0.5).half()
    bias = torch.randn(n, generator=gen)
    t = packed.tensors
    args = [t[name] for name in packing.CODE_TENSOR_NAMES] + [col_scale, row_scale]
    return codes, [a.to(DEVICE) for a in args], bias.to(DEVICE)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol_rel, rtol, floor = TOL[dtype]
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    scale = ref.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol_rel * scale, rtol=rtol)
    assert sqnr_db(ref, out) >= floor, f"SQNR {sqnr_db(ref, out):.1f} dB < {floor} dB"


def launch(*args, config=None):
    from watersic_hf.kernels.packed_matmul import _launch

    return _launch(*args, config=config)


@pytest.mark.parametrize("m", [1, 7, 16, 33, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_twin(m, dtype):
    from watersic_hf.kernels import triton_packed_matmul

    _, args, bias = make_layer(97, 161, seed=m)
    x = torch.randn(m, 161, device=DEVICE).to(dtype)
    out = triton_packed_matmul(x, *args, bias.to(dtype))
    check(out, ops.torch_packed_matmul(x, *args, bias.to(dtype)), dtype)


@pytest.mark.parametrize(
    "m,config",
    [
        (1, {"BLOCK_N": 32, "SPLIT_K": 1, "GPS": 1}),
        (3, {"BLOCK_N": 64, "SPLIT_K": 3, "GPS": 4}),
        (9, {"BLOCK_N": 32, "SPLIT_K": 2, "GPS": 1}),  # decode with tl.dot (M > 4)
        (16, {"BLOCK_N": 128, "SPLIT_K": 5, "GPS": 2}),
        (20, {"BLOCK_M": 16, "BLOCK_N": 32, "GPS": 1}),
        (40, {"BLOCK_M": 32, "BLOCK_N": 64, "GPS": 4}),
    ],
)
def test_tile_configs(m, config):
    # split-K counts that do not divide the number of steps, partial groups, N below the tile
    _, args, bias = make_layer(45, 203, seed=100 + m)
    x = torch.randn(m, 203, device=DEVICE, dtype=torch.float16)
    check(launch(x, *args, bias.half(), config=config), ops.torch_packed_matmul(x, *args,
          bias.half()), torch.float16)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 40), (33, 1), (64, 32)])
def test_degenerate_shapes(n, k):
    _, args, bias = make_layer(n, k, seed=n * 1000 + k)
    for m in (1, 18):
        x = torch.randn(m, k, device=DEVICE)
        from watersic_hf.kernels import triton_packed_matmul

        check(triton_packed_matmul(x, *args, None), ops.torch_packed_matmul(x, *args, None),
              torch.float32)


def test_empty_batch():
    from watersic_hf.kernels import triton_packed_matmul

    _, args, bias = make_layer(20, 40)
    out = triton_packed_matmul(torch.randn(0, 40, device=DEVICE), *args, bias)
    assert out.shape == (0, 20)


def test_huge_codes_are_exact_in_fp16_path():
    # codes up to ±2·10^4 exceed fp16's exact integers (2048): the kernel must split them
    codes, args, _ = make_layer(64, 96, seed=7, outlier=20000.0)
    assert codes.abs().max() > 2048 * 4
    x = torch.randn(40, 96, device=DEVICE, dtype=torch.float16)
    out = launch(x, *args, None, config={"BLOCK_M": 32, "BLOCK_N": 32, "GPS": 2})
    ref = ops.torch_packed_matmul(x, *args, None)
    check(out, ref, torch.float16)


def test_strided_activations():
    _, args, bias = make_layer(50, 70, seed=8)
    base = torch.randn(70, 12, device=DEVICE)
    x = base.t()[::2]  # (6, 70), non-contiguous rows and columns
    from watersic_hf.kernels import triton_packed_matmul

    check(triton_packed_matmul(x, *args, bias), ops.torch_packed_matmul(x, *args, bias),
          torch.float32)


def test_rejects_mismatched_inputs():
    from watersic_hf.kernels import triton_packed_matmul

    _, args, _ = make_layer(20, 40)
    with pytest.raises(ValueError, match="K=41"):
        triton_packed_matmul(torch.randn(2, 41, device=DEVICE), *args, None)
    with pytest.raises(ValueError, match="2-D"):
        triton_packed_matmul(torch.randn(2, 2, 40, device=DEVICE), *args, None)
    with pytest.raises(ValueError, match="BLOCK_N"):
        launch(torch.randn(2, 40, device=DEVICE), *args, None,
               config={"BLOCK_N": 48, "SPLIT_K": 1, "GPS": 1})


def test_custom_op_traces_with_triton_backend():
    # torch.compile sees the custom op through its fake implementation; the kernel runs inside
    _, args, bias = make_layer(40, 64, seed=9)
    tensors = dict(zip(packing.CODE_TENSOR_NAMES, args[:5], strict=True))

    def f(x):
        return ops.packed_linear(x, tensors, args[5], args[6], bias, backend="triton") * 2

    x = torch.randn(3, 64, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    check(compiled(x), 2 * ops.torch_packed_matmul(x, *args, bias), torch.float32)


_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from watersic_hf.kernels.packed_matmul import _compile_signature, _packed_matmul_kernel
for xdt, cfg, warps, stages in eval(sys.argv[1]):
    sig, consts = _compile_signature(xdt, cfg)
    src = ASTSource(fn=_packed_matmul_kernel, signature=sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "num_stages": stages})
    assert "mma" in out.asm["ptx"] or not consts["USE_DOT"]
print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this Triton build has no NVIDIA backend")
def test_kernel_compiles_for_h100_without_a_gpu():
    # Triton lowers to PTX and runs its bundled ptxas without a driver: this catches kernels
    # that only work in the interpreter (layouts, dtypes, control flow) on a CPU-only machine
    def case(m, use_dot, kind, bm, bn, sk, gps):
        return dict(M=m, USE_DOT=use_dot, DOT_KIND=kind, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk,
                    GPS=gps)

    cases = [
        ("fp16", case(1, False, 1, 1, 64, 4, 1), 4, 2),  # GEMV, broadcast-FMA
        ("bf16", case(16, True, 2, 16, 64, 2, 2), 4, 2),  # decode with tl.dot, bf16
        ("fp16", case(512, True, 1, 64, 64, 1, 1), 4, 3),  # prefill
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, repr(cases)], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).parent)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autotuned_matches_torch(m, dtype):
    from watersic_hf.kernels import triton_packed_matmul

    _, args, bias = make_layer(1536, 1024, seed=m)
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    check(triton_packed_matmul(x, *args, bias.to(dtype)),
          ops.torch_packed_matmul(x, *args, bias.to(dtype)), dtype)
