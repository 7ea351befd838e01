"""The numba CPU kernels against their torch twin, the dispatch to them, and a tiny model."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_tiny_model
from torch import nn

from watersic_hf import ops, packing
from watersic_hf._numba import HAS_NUMBA
from watersic_hf.nn import WaterSICLinear

pytestmark = pytest.mark.skipif(not HAS_NUMBA, reason="needs numba")

# fp32 accumulation in a different order than the twin's matmul: relative to the output's RMS
ATOL_REL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ck():
    from watersic_hf import cpu_kernels

    return cpu_kernels


@pytest.fixture(params=["compress", "walk"])
def listing(request, ck, monkeypatch):
    """Both ways of listing escapes: vpcompressd (AVX-512 only) and the portable bit walk."""
    if request.param == "compress" and not ck.HAS_AVX512:
        pytest.skip("no AVX-512 on this CPU")
    monkeypatch.setattr(ck, "_USE_COMPRESS", request.param == "compress")
    return request.param


@pytest.fixture(params=[1, 2])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def make_layer(n: int, k: int, *, seed: int = 0, outlier: float = 6000.0, spread: float = 2.5):
    """Packed codes with per-column spreads, an outlier column (escapes) and a dead column."""
    gen = torch.Generator().manual_seed(seed)
    col = spread * torch.exp(0.7 * torch.randn(k, generator=gen))
    codes = (torch.randn(n, k, generator=gen) * col).round().to(torch.int32)
    codes[:, k // 3] = (torch.randn(n, generator=gen) * outlier).round().int()
    col_scale = (torch.rand(k, generator=gen) * 0.02 + 1e-3).half()
    if k > 4:
        codes[:, 1] = 0  # dead column: all-zero codes and a zero scale
        col_scale[1] = 0
    packed = packing.pack_codes(codes)
    row_scale = (torch.rand(n, generator=gen) + 0.5).half()
    t = packed.tensors
    args = [t[name] for name in packing.CODE_TENSOR_NAMES] + [col_scale, row_scale]
    return codes, args, torch.randn(n, generator=gen)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    scale = ref.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL_REL[dtype] * scale,
                               rtol=ATOL_REL[dtype])


def escape_groups(args) -> int:
    return int((args[1][:, packing.META_ESC_SLOT] >= 0).sum())


@pytest.mark.parametrize("m", [1, 3, 16, 17, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_twin(ck, listing, threads, m, dtype):
    # 200 rows: several 32-row escape chunks, a partial last one, and (2 threads) two shares
    _, args, bias = make_layer(200, 161, seed=m)
    assert escape_groups(args) > 0
    x = torch.randn(m, 161).to(dtype)
    check(ck.cpu_packed_matmul(x, *args, bias.to(dtype)),
          ops.torch_packed_matmul(x, *args, bias.to(dtype)), dtype)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 40), (33, 1), (64, 32), (97, 161), (45, 203)])
@pytest.mark.parametrize("m", [1, 17])
def test_odd_shapes(ck, listing, n, k, m):
    _, args, bias = make_layer(n, k, seed=n * 1000 + k)
    x = torch.randn(m, k)
    for b in (bias, None):
        check(ck.cpu_packed_matmul(x, *args, b), ops.torch_packed_matmul(x, *args, b),
              torch.float32)


@pytest.mark.parametrize("width", range(0, packing.MAX_WIDTH + 1))
def test_every_width(ck, listing, width):
    # uniform codes over exactly 2^width values: both groups get that width, no escapes
    gen = torch.Generator().manual_seed(width)
    lo = -(1 << width) // 2
    codes = torch.randint(lo, lo + (1 << width), (70, 64), generator=gen, dtype=torch.int32)
    codes[0, :], codes[1, :] = lo, lo + (1 << width) - 1
    t = packing.pack_codes(codes).tensors
    assert t["weight_group_meta"][:, packing.META_WIDTH].tolist() == [width, width]
    args = [t[name] for name in packing.CODE_TENSOR_NAMES]
    args += [torch.full((64,), 2.0**-width).half(), (torch.rand(70) + 0.5).half()]
    for m in (1, 40):
        x = torch.randn(m, 64)
        check(ck.cpu_packed_matmul(x, *args, None), ops.torch_packed_matmul(x, *args, None),
              torch.float32)


def test_escapes_in_many_chunks_and_huge_codes(ck, listing, threads):
    # heavy tails: escapes in most groups and chunks; codes beyond fp16 and bf16 exactness
    codes, args, bias = make_layer(333, 96, seed=7, outlier=3e6, spread=6.0)
    assert codes.abs().max() > 2**21
    base = args[4]  # escape counts before each 32-row chunk
    assert escape_groups(args) >= 2 and base.shape[1] == 11 and int(base[:, -1].max()) > 0
    for m in (1, 5, 40):
        x = torch.randn(m, 96)
        check(ck.cpu_packed_matmul(x, *args, bias), ops.torch_packed_matmul(x, *args, bias),
              torch.float32)


def test_numba_pool_fallback(ck, monkeypatch):
    # where torch has no GOMP_parallel, the kernels split the work on numba's own pool
    monkeypatch.setattr(ck, "_GOMP_PARALLEL", 0)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _, args, bias = make_layer(300, 100, seed=11)
        for m in (1, 20):
            x = torch.randn(m, 100)
            check(ck.cpu_packed_matmul(x, *args, bias), ops.torch_packed_matmul(x, *args, bias),
                  torch.float32)
        assert torch.get_num_threads() == 2  # numba's pool start must not change torch's
    finally:
        torch.set_num_threads(saved)


def test_prefill_in_several_tiles(ck, monkeypatch):
    # a small tile budget forces several row tiles, the last one partial
    monkeypatch.setattr(ck, "PREFILL_TILE_BYTES", 4 * 64 * 96)
    _, args, bias = make_layer(150, 70, seed=12)
    x = torch.randn(30, 70)
    check(ck.cpu_packed_matmul(x, *args, bias), ops.torch_packed_matmul(x, *args, bias),
          torch.float32)


def test_strided_and_empty_inputs(ck):
    _, args, bias = make_layer(50, 70, seed=8)
    x = torch.randn(70, 12).t()[::2]  # (6, 70), neither rows nor columns contiguous
    check(ck.cpu_packed_matmul(x, *args, bias), ops.torch_packed_matmul(x, *args, bias),
          torch.float32)
    assert ck.cpu_packed_matmul(torch.randn(0, 70), *args, bias).shape == (0, 50)


def test_rejects_mismatched_inputs(ck):
    _, args, _ = make_layer(20, 40)
    with pytest.raises(ValueError, match="K=41"):
        ck.cpu_packed_matmul(torch.randn(2, 41), *args, None)
    with pytest.raises(ValueError, match="2-D"):
        ck.cpu_packed_matmul(torch.randn(2, 2, 40), *args, None)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        ops.resolve_backend("cpu", torch.device("cuda"))


def test_replaced_weights_are_not_served_from_the_view_cache(ck):
    _, args, _ = make_layer(40, 64, seed=9)
    x = torch.randn(1, 64)
    before = ck.cpu_packed_matmul(x, *args, None)
    args[6] = nn.Parameter(args[6] * 2, requires_grad=False)  # a new row-scale tensor
    after = ck.cpu_packed_matmul(x, *args, None)
    torch.testing.assert_close(after, 2 * before)
    args[0].data = args[0].clone()  # same tensor object, new memory
    torch.testing.assert_close(ck.cpu_packed_matmul(x, *args, None), after)


def fake_qw(linear: nn.Linear, seed: int):
    """Synthetic codes for a real layer: fp16-exact row/column scales, rounding."""
    from types import SimpleNamespace

    w = linear.weight.detach().float()
    gen = torch.Generator().manual_seed(seed)
    col_scale = (w.abs().mean(0) / 3 * (1 + 0.5 * torch.rand(w.shape[1], generator=gen)))
    col_scale = col_scale.half().float()
    row_scale = (w.abs().mean(1) / w.abs().mean()).half().float()
    codes = torch.round(w / (row_scale[:, None] * col_scale[None, :])).to(torch.int32)
    return SimpleNamespace(codes=codes, col_scale=col_scale, row_scale=row_scale,
                           dead_columns=None)


@pytest.fixture(scope="module")
def tiny_packed_model():
    model = make_tiny_model("llama")
    for i, layer in enumerate(model.model.layers):
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0])
                new = WaterSICLinear.from_quantized(fake_qw(child, seed=i), child.bias)
                setattr(parent, name.rsplit(".", 1)[-1], new)
    return model


def test_auto_picks_cpu_kernels_and_generate_matches_torch(tiny_packed_model, monkeypatch):
    model = tiny_packed_model
    assert ops.resolve_backend("auto", torch.device("cpu")) is ops.Backend.CPU
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=8, do_sample=False)
        fast_logits = model(ids).logits
        monkeypatch.setenv("WATERSIC_BACKEND", "torch")
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        ref_logits = model(ids).logits
    assert torch.equal(fast, ref)
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_environment_selects_cpu_backend(monkeypatch):
    m = WaterSICLinear.from_quantized(fake_qw(nn.Linear(40, 8), seed=0), None, backend="torch")
    x = torch.randn(3, 40)
    ref, ref16 = m(x), m(x.bfloat16())
    monkeypatch.setenv("WATERSIC_BACKEND", "cpu")
    assert ops.resolve_backend(m.backend, x.device) is ops.Backend.CPU
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    m.backend = "cpu"
    monkeypatch.delenv("WATERSIC_BACKEND")
    check(m(x.bfloat16()), ref16, torch.bfloat16)


def test_custom_op_compiles_with_cpu_backend():
    _, args, bias = make_layer(40, 64, seed=10)
    tensors = dict(zip(packing.CODE_TENSOR_NAMES, args[:5], strict=True))

    def f(x):
        return ops.packed_linear(x, tensors, args[5], args[6], bias, backend="cpu") * 2

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    check(compiled(x), 2 * ops.torch_packed_matmul(x, *args, bias), torch.float32)
