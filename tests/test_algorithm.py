"""Core tests of the single-layer quantizers: worked example, loop equivalence, exact bounds
(C1, C2, C13 of algorithm.md section 6), rate accounting, storage precision and input checks."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from watersic_hf.algorithm import (
    QuantizedWeight,
    column_entropies,
    find_dead_columns,
    gptq_entropy_quantize,
    pooled_entropy,
    rtn_quantize,
    watersic_quantize,
    zsic,
    zsic_reference,
)
from watersic_hf.algorithm._scales import fp16_balance
from watersic_hf.algorithm.stats import transformed_target

# Many small tensor operations: run this module with one intra-op thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def rotated_sigma(n: int, decades: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lam = 10.0 ** (-decades * torch.arange(n, dtype=torch.float64) / (n - 1))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = (q * lam[None, :]) @ q.T
    return 0.5 * (s + s.T)


def gaussian(a: int, n: int, seed: int, col_sigma: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(a, n, generator=gen, dtype=torch.float64)
    return w * torch.exp(col_sigma * torch.randn(n, generator=gen, dtype=torch.float64))


def plugin_entropy(values) -> float:
    """Independent oracle: plug-in entropy of a list of ints, with collections.Counter."""
    counts = Counter(values)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


# --- the worked 3×3 example of docs/algorithm.md ---------------------------------------------


def test_worked_3x3_example():
    sigma = torch.tensor([[4.0, 2.0, 0.0], [2.0, 5.0, 2.0], [0.0, 2.0, 2.0]])
    w = torch.tensor([[0.8, -0.3, 1.3]])
    chol = torch.linalg.cholesky(sigma.double())
    assert torch.equal(chol, torch.tensor([[2.0, 0, 0], [1, 2, 0], [0, 1, 1]], dtype=torch.float64))
    q = watersic_quantize(w, sigma, step=1.0, damp=0.0, lmmse=False, rescale=False)
    assert q.step == 1.0
    assert q.codes.tolist() == [[1, 0, 1]]
    assert q.col_scale.tolist() == [0.5, 0.5, 1.0]  # α = c / L_ii
    assert q.row_scale.tolist() == [1.0]
    w_hat = q.dequantize().double()
    assert w_hat.tolist() == [[0.5, 0.0, 1.0]]
    err_t = (w.double() - w_hat) @ chol  # transformed-domain error, each entry within ±c/2
    assert torch.allclose(err_t, torch.tensor([[0.3, -0.3, 0.3]], dtype=torch.float64), atol=1e-6)
    d_sic = float(err_t.pow(2).mean())
    assert d_sic == pytest.approx(0.09, abs=1e-6)
    # Plain RTN with the same per-column steps: codes [2, -1, 1] and more than twice the error.
    alpha = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    z_rtn = torch.round(w.double() / alpha)
    assert z_rtn.tolist() == [[2.0, -1.0, 1.0]]
    err_rtn = (w.double() - z_rtn * alpha) @ chol
    assert torch.allclose(err_rtn, torch.tensor([[-0.2, 0.7, 0.3]], dtype=torch.float64),
                          atol=1e-6)
    assert float(err_rtn.pow(2).mean()) == pytest.approx(0.62 / 3, abs=1e-6)


# --- blocked loop == column loop -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lmmse", [True, False])
@pytest.mark.parametrize("shape,block", [((1, 5), 2), ((37, 70), 16), ((96, 140), 128),
                                         ((24, 40), 1)])
def test_blocked_equals_column_loop(dtype, lmmse, shape, block):
    a, n = shape
    sigma = rotated_sigma(n, 2.0, 1)
    chol = torch.linalg.cholesky(sigma)
    y = (gaussian(a, n, 2) @ chol).to(dtype)
    for steps in (torch.full((n,), 0.3, dtype=dtype), 0.05 * chol.diagonal().to(dtype)):
        z_ref, g_ref = zsic_reference(y, chol.to(dtype), steps, lmmse=lmmse)
        y_copy = y.clone()
        z_blk, g_blk = zsic(y, chol.to(dtype), steps, lmmse=lmmse, block_size=block)
        assert torch.equal(y, y_copy)  # the target is not modified
        assert torch.equal(z_ref, z_blk)
        tol = 1e-12 if dtype == torch.float64 else 1e-4
        assert torch.allclose(g_ref, g_blk, atol=tol, rtol=tol)


# --- C1: exact SIC error bound ---------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 0.1, 0.01])
def test_c1_sic_error_bound(c):
    a, n = 4096, 64
    sigma = rotated_sigma(n, 2.0, 3)
    w = torch.randn(a, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q = watersic_quantize(w, sigma, step=c, lmmse=False, rescale=False)
    chol = torch.linalg.cholesky(sigma + 1e-4 * float(sigma.diagonal().mean()) * torch.eye(n))
    w_hat = q.codes.double() * (c / chol.diagonal())[None, :]  # exact α, not the fp16 copy
    err = (w - w_hat) @ chol
    assert float(err.abs().max()) <= c / 2 * (1 + 1e-9)
    ratio = float(err.pow(2).mean()) / (c**2 / 12)
    if c <= 0.1:
        assert 0.98 <= ratio <= 1.02, ratio


# --- C2: plain target == general target -----------------------------------------------------


def test_c2_plain_equals_general_target():
    a, n = 96, 80
    sigma = rotated_sigma(n, 2.0, 5)
    w = gaussian(a, n, 6)
    delta = 1e-4 * float(sigma.diagonal().mean())
    chol = torch.linalg.cholesky(sigma + delta * torch.eye(n, dtype=torch.float64))
    plain = transformed_target(w, chol, delta)
    general = transformed_target(w, chol, delta, sigma_x_xhat=sigma,
                                 sigma_residual=torch.zeros(a, n, dtype=torch.float64))
    assert float((plain - general).abs().max()) <= 1e-13 * float(plain.abs().max())


@pytest.mark.parametrize("method", [watersic_quantize, gptq_entropy_quantize])
def test_c2_identical_codes_through_public_api(method):
    a, n = 256, 64
    sigma = rotated_sigma(n, 2.0, 7).float()
    w = gaussian(a, n, 8).float()
    plain = method(w, sigma, 2.5)
    qronos = method(w, sigma, 2.5, sigma_xhat=sigma, sigma_x_xhat=sigma,
                    sigma_residual=torch.zeros(a, n))
    assert torch.equal(plain.codes, qronos.codes)
    assert plain.step == pytest.approx(qronos.step, rel=1e-12)
    assert torch.allclose(plain.dequantize(), qronos.dequantize(), rtol=2e-3, atol=1e-6)


# --- C13: dead features and rate accounting --------------------------------------------------


@pytest.mark.parametrize("dead_value", [0.0, 1e-12])
def test_c13_dead_feature(dead_value):
    a, n, j = 512, 32, 11
    sigma = rotated_sigma(n, 1.0, 9)
    sigma[j, :] = 0.0
    sigma[:, j] = 0.0
    sigma[j, j] = dead_value
    w = gaussian(a, n, 10)
    q = watersic_quantize(w, sigma, 3.0)
    assert q.dead_columns.tolist() == [j]
    assert q.n_dead == 1
    assert int(q.codes[:, j].abs().sum()) == 0 and float(q.col_scale[j]) == 0.0
    assert float(q.dequantize()[:, j].abs().sum()) == 0.0
    live = torch.cat([q.codes[:, :j], q.codes[:, j + 1 :]], 1)
    h_pool = plugin_entropy(live.flatten().tolist())
    assert q.entropy_bits() == pytest.approx(h_pool, abs=1e-12)
    expected = (h_pool * a * (n - 1) + 16 * a + 16 * (n - 1) + 16) / (a * n)
    assert q.rate_bits == pytest.approx(expected, abs=1e-12)
    # target="original" means bits per ORIGINAL entry, dead index included.
    assert q.rate_bits == pytest.approx(3.0, abs=0.02)


def test_target_live_uses_plain_formula():
    a, n = 512, 32
    sigma = rotated_sigma(n, 1.0, 11)
    sigma[3, :] = sigma[:, 3] = 0.0
    w = gaussian(a, n, 12)
    orig = watersic_quantize(w, sigma, 2.0, target="original", rescale=False)
    live = watersic_quantize(w, sigma, 2.0, target="live", rescale=False)
    assert live.entropy_target == pytest.approx(2.0 - 16 / 31 - 16 / a)
    assert orig.entropy_target == pytest.approx(
        2.0 * 32 / 31 - 16 / 31 - 16 / a - 16 / (a * 31))
    assert orig.entropy_target > live.entropy_target
    assert abs(live.entropy_bits() - live.entropy_target) < 0.02


def test_median_rule():
    d = torch.ones(64, dtype=torch.float64)
    d[5] = 1e6  # one huge feature must not make the others dead (a mean rule would)
    assert find_dead_columns(torch.diag(d)).numel() == 0
    d[7], d[9], d[11] = 5e-4, -1.0, 0.0
    assert find_dead_columns(torch.diag(d)).tolist() == [7, 9, 11]
    assert find_dead_columns(d, threshold=1e-4).tolist() == [9, 11]  # the diagonal also works
    assert find_dead_columns(torch.diag(d)).dtype == torch.int64


def test_singular_sigma_still_quantizes():
    a, n, tokens = 128, 64, 16  # rank 16 < 64 features
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(13))
    sigma = x.T @ x / tokens
    q = watersic_quantize(gaussian(a, n, 14).float(), sigma, 2.0)
    assert torch.isfinite(q.dequantize()).all()
    assert q.rate_bits == pytest.approx(2.0, abs=0.05)


# --- baselines and shared accounting -----------------------------------------------------------


@pytest.mark.parametrize("bits", [0.5, 2.0, 3.0, 4.0, 8.0])
def test_all_methods_hit_the_rate(bits):
    a, n = 384, 96
    sigma = rotated_sigma(n, 2.0, 15)
    w = gaussian(a, n, 16).float()
    errs = {}
    for method in (watersic_quantize, gptq_entropy_quantize, rtn_quantize):
        q = method(w, sigma, bits)
        assert isinstance(q, QuantizedWeight)
        assert q.codes.dtype == torch.int32 and q.codes.shape == (a, n)
        assert q.rate_bits == pytest.approx(bits, abs=0.03 if bits < 8 else 0.05)
        assert q.search_evals <= 6
        e = w.double() - q.dequantize().double()
        errs[q.method] = float(((e @ sigma) * e).sum() / ((w.double() @ sigma) * w.double()).sum())
    assert errs["watersic"] < errs["rtn"]
    if bits >= 2:
        assert errs["watersic"] < errs["gptq_entropy"] < errs["rtn"]


def test_gptq_and_rtn_structure():
    a, n = 200, 48
    sigma = rotated_sigma(n, 2.0, 17)
    w = gaussian(a, n, 18)
    g = gptq_entropy_quantize(w, sigma, 3.0)
    assert torch.all(g.row_scale == 1.0)
    assert torch.all(g.col_scale == g.col_scale[0])  # one common step Δ (no LMMSE by default)
    assert float(g.col_scale[0]) == pytest.approx(g.step, rel=1e-3)
    r = rtn_quantize(w, bits=3.0)
    assert r.dead_columns.numel() == 0
    rms = w.pow(2).mean(1).sqrt()
    assert torch.equal(r.codes, torch.round(w / (r.step * rms)[:, None]).to(torch.int32))
    assert torch.allclose(r.row_scale.double(), r.step * rms * float(r.col_scale[0]) ** -1,
                          rtol=1e-3)
    # Same accounting formula for every method.
    for q in (g, r):
        h = plugin_entropy(q.codes.flatten().tolist())
        assert q.rate_bits == pytest.approx((h * a * n + 16 * a + 16 * n) / (a * n), abs=1e-12)


def test_entropy_helpers_match_oracle():
    gen = torch.Generator().manual_seed(19)
    codes = torch.round(torch.randn(300, 7, generator=gen) * torch.arange(1, 8)).to(torch.int32)
    assert pooled_entropy(codes) == pytest.approx(plugin_entropy(codes.flatten().tolist()))
    per_col = column_entropies(codes)
    for j in range(7):
        assert float(per_col[j]) == pytest.approx(plugin_entropy(codes[:, j].tolist()), abs=1e-12)
    q = QuantizedWeight(codes=codes, col_scale=torch.ones(7), row_scale=torch.ones(300),
                        dead_columns=torch.tensor([2]), step=1.0, method="test", target_bits=3.0)
    keep = [0, 1, 3, 4, 5, 6]
    assert q.entropy_bits() == pytest.approx(plugin_entropy(codes[:, keep].flatten().tolist()))
    assert q.entropy_bits(per_column=True) == pytest.approx(float(per_col[keep].mean()))


def test_determinism_and_inputs_untouched():
    a, n = 300, 40
    sigma = rotated_sigma(n, 2.0, 20).float()
    w = gaussian(a, n, 21).to(torch.bfloat16)
    w_copy, s_copy = w.clone(), sigma.clone()
    q1 = watersic_quantize(w, sigma, 2.0, seed=3)
    q2 = watersic_quantize(w, sigma, 2.0, seed=3)
    assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.col_scale, q2.col_scale)
    assert torch.equal(q1.row_scale, q2.row_scale)
    assert torch.equal(w, w_copy) and torch.equal(sigma, s_copy)
    assert q1.dequantize().dtype == torch.float32


def test_accepts_nn_linear_parameter():
    lin = torch.nn.Linear(40, 24)  # weight is a Parameter with requires_grad=True
    sigma = rotated_sigma(40, 1.0, 28).float()
    for q in (watersic_quantize(lin.weight, sigma, 3.0),
              gptq_entropy_quantize(lin.weight, sigma, 3.0), rtn_quantize(lin.weight, bits=3.0)):
        for t in (q.codes, q.col_scale, q.row_scale):
            assert not t.requires_grad
        moved = q.to("cpu")
        assert torch.equal(moved.dequantize(), q.dequantize()) and moved.method == q.method


# --- storage precision: fp16-exact scales ----------------------------------------------------


def _is_fp16_exact(x: torch.Tensor) -> bool:
    return torch.equal(x, x.to(torch.float16).to(torch.float32))


@pytest.mark.parametrize("weight_scale", [1e-7, 1.0, 3e4])
def test_scales_are_fp16_exact_and_in_range(weight_scale):
    a, n = 256, 48
    sigma = rotated_sigma(n, 3.0, 22)
    w = gaussian(a, n, 23) * weight_scale
    q = watersic_quantize(w, sigma, 3.0)
    for s in (q.col_scale, q.row_scale):
        assert s.dtype == torch.float32 and _is_fp16_exact(s)
        nz = s.abs()[s != 0]
        assert float(nz.min()) >= 2.0**-14 and float(nz.max()) <= 65504.0
    # Far outside fp16's range without balancing (α ~ 1e-8 or ~1e4), still accurate:
    e = w - q.dequantize().double()
    rel = float(((e @ sigma) * e).sum() / ((w @ sigma) * w).sum())
    assert rel < 0.05
    ref = watersic_quantize(w / weight_scale, sigma, 3.0)
    assert rel == pytest.approx(
        float(((w / weight_scale - ref.dequantize().double()) @ sigma
               * (w / weight_scale - ref.dequantize().double())).sum()
              / ((w / weight_scale) @ sigma * (w / weight_scale)).sum()), rel=0.02)


def test_fp16_balance_moves_a_power_of_two():
    row = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    col = 2.0 ** -torch.arange(0, 26, dtype=torch.float64) * 1.1
    r16, c16, k = fp16_balance(row, col)
    assert k == -11  # closest to 0 that puts col·2^-k ≥ 2^-14 and row·2^k ≤ 65504
    assert _is_fp16_exact(r16) and _is_fp16_exact(c16)
    assert float(c16.min()) >= 2.0**-14
    prod = r16.double()[:, None] * c16.double()[None, :]
    assert torch.allclose(prod, row[:, None] * col[None, :], rtol=1e-3)
    r16, c16, k = fp16_balance(row, torch.tensor([0.3, 0.0, 7.0], dtype=torch.float64))
    assert k == 0 and torch.equal(r16, row.float()) and float(c16[1]) == 0.0


# --- bad input -------------------------------------------------------------------------------


def _bad_cases():
    n = 8
    w = torch.randn(16, n)
    s = torch.eye(n)
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    inf_s = s.clone()
    inf_s[1, 1] = float("inf")
    asym = s.clone()
    asym[0, 1] = 0.5
    return [
        ((nan_w, s), {}, ValueError, "weight"),
        ((w[0], s), {}, ValueError, "weight"),
        ((w.int(), s), {}, TypeError, "weight"),
        (([[1.0]], s), {}, TypeError, "weight"),
        ((w, torch.eye(n + 1)), {}, ValueError, "sigma_x"),
        ((w, asym), {}, ValueError, "sigma_x is not symmetric"),
        ((w, torch.zeros(n, n)), {}, ValueError, "sigma_x is all zeros"),
        ((w, inf_s), {}, ValueError, "sigma_x contains NaN"),
        ((w, -s), {}, ValueError, "every input feature"),
        ((w, s), {"sigma_xhat": torch.eye(n - 1)}, ValueError, "sigma_xhat"),
        ((w, s), {"sigma_x_xhat": torch.full((n, n), float("nan"))}, ValueError, "sigma_x_xhat"),
        ((w, s), {"sigma_residual": torch.zeros(n, n)}, ValueError, "sigma_residual"),
        ((w, s), {"bits": 0.0}, ValueError, "bits"),
        ((w, s), {"bits": 16.5}, ValueError, "bits"),
        ((w, s), {"bits": float("nan")}, ValueError, "bits"),
        ((w, s), {"bits": True}, TypeError, "bits"),
        ((w, s), {"step": -1.0}, ValueError, "step"),
        ((w, s), {"damp": -1e-4}, ValueError, "damp"),
        ((w, s), {"target": "model"}, ValueError, "target"),
        ((w, s), {"dead_threshold": 1.5}, ValueError, "dead_threshold"),
        ((w, s), {"block_size": 0}, ValueError, "block_size"),
    ]


@pytest.mark.parametrize("args,kwargs,exc,match", _bad_cases())
def test_bad_input_watersic(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        watersic_quantize(*args, **kwargs)


def test_bad_input_baselines():
    w, s = torch.randn(16, 8), torch.eye(8)
    with pytest.raises(ValueError, match="bits"):
        gptq_entropy_quantize(w, s, 0.01)
    with pytest.raises(ValueError, match="sigma_x"):
        gptq_entropy_quantize(w, torch.eye(4))
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(w, bits=20)
    with pytest.raises(ValueError, match="weight"):
        rtn_quantize(torch.full((4, 4), float("inf")))


def test_fractional_bits_range():
    a, n = 256, 64
    sigma = rotated_sigma(n, 2.0, 24)
    w = gaussian(a, n, 25)
    for bits in (0.55, 1.37, 5.5, 7.9):
        q = watersic_quantize(w, sigma, bits)
        assert q.rate_bits == pytest.approx(bits, abs=0.05)
    # A target below the side-information cost still returns a valid (nearly all-zero) layer.
    q = watersic_quantize(w, sigma, 0.05)
    assert torch.isfinite(q.dequantize()).all() and q.entropy_bits() < 0.1


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a, n = 512, 256
    sigma = rotated_sigma(n, 2.0, 26).float()
    w = gaussian(a, n, 27).float()
    cpu = watersic_quantize(w, sigma, 3.0)
    gpu = watersic_quantize(w.cuda(), sigma.cuda(), 3.0)
    for t in (gpu.codes, gpu.col_scale, gpu.row_scale, gpu.dead_columns):
        assert t.is_cuda
    assert abs(gpu.rate_bits - cpu.rate_bits) < 0.02
    agree = float((gpu.codes.cpu() == cpu.codes).double().mean())
    assert agree > 0.99
    for q in (gptq_entropy_quantize(w.cuda(), sigma.cuda(), 3.0), rtn_quantize(w.cuda(), bits=3.0)):
        assert q.codes.is_cuda and q.rate_bits == pytest.approx(3.0, abs=0.03)
