"""Numerical guards of the single-layer quantizers: fp16 scale range (no subnormals), entropy
targets capped at what a layer can carry, pseudo-inverse fallbacks for singular solves, and the
final finite check of every output."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import watersic_hf.algorithm.api as api
from watersic_hf.algorithm import gptq_entropy_quantize, rtn_quantize, watersic_quantize
from watersic_hf.algorithm._scales import FP16_RESOLUTION, fp16_balance
from watersic_hf.algorithm.rescalers import RescalerResult, _spd_solve, fit_rescalers
from watersic_hf.algorithm.search import entropy_target, max_entropy_bits, max_live_rate_bits
from watersic_hf.algorithm.stats import _right_solve_lt, damped_cholesky
from watersic_hf.integration.engine.observers import RateControl

pytestmark = pytest.mark.usefixtures("one_thread")

MIN_NORMAL = 2.0**-14


def _no_subnormal(v: torch.Tensor) -> bool:
    mag = v.abs()
    return bool(((mag == 0) | (mag >= MIN_NORMAL)).all())


def _fp16_exact(v: torch.Tensor) -> bool:
    return torch.equal(v.to(torch.float16).to(torch.float32), v)


def _rel_wmse(w: torch.Tensor, q, sigma: torch.Tensor) -> float:
    e = w.to(torch.float64) - q.dequantize().to(torch.float64)
    return float(((e @ sigma) * e).sum() / ((w @ sigma) * w).sum())


# --- 1. fp16 balancing: no subnormal scales ---------------------------------------------------


def test_fp16_balance_flushes_a_negligible_row_instead_of_a_subnormal():
    # Columns span 2^[-10, 15] and one row is 2^-20: no power of two fits everything (the old
    # midpoint choice made that row subnormal and pushed the big columns towards 65504).
    row = torch.tensor([1.0, 2.0**-20, 1.5], dtype=torch.float64)
    col = 2.0 ** torch.linspace(-10, 15, 26, dtype=torch.float64) * 1.1
    r16, c16, k = fp16_balance(row, col)
    assert k == 0  # the two live rows and every column fit as they are
    assert float(r16[1]) == 0.0
    assert _no_subnormal(r16) and _no_subnormal(c16)
    assert _fp16_exact(r16) and _fp16_exact(c16)
    live = torch.tensor([0, 2])
    prod = r16.double()[live, None] * c16.double()[None, :]
    assert torch.allclose(prod, row[live, None] * col[None, :], rtol=1e-3)


def test_fp16_balance_uses_codes_to_tell_negligible_from_small():
    row = torch.tensor([1.0, 2.0**-8], dtype=torch.float64)
    col = torch.tensor([1.5 * 2.0**-24, 2.0**8], dtype=torch.float64)
    small = torch.ones(2, 2, dtype=torch.float64)
    # With codes of magnitude 1, column 0 contributes 2^-23.4 of a 2^8 entry: negligible -> 0.
    r16, c16, _ = fp16_balance(row, col, small)
    assert float(c16[0]) == 0.0 and _no_subnormal(c16) and _no_subnormal(r16)
    assert float(c16[1] * r16[0]) == pytest.approx(2.0**8, rel=1e-3)
    # With codes up to 2^22 in column 0 the same scale carries entries of 2^-1.4: it is kept
    # (as a subnormal, with a warning) and nothing overflows.
    big = small.clone()
    big[:, 0] = 2.0**22
    logs = logging.getLogger("watersic_hf.algorithm._scales")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logs.addHandler(handler)
    try:
        r16, c16, k = fp16_balance(row, col, big)
    finally:
        logs.removeHandler(handler)
    assert any("subnormal" in r.getMessage() for r in records)
    assert float(c16[0]) != 0.0
    assert float(c16.abs().max()) < 65504.0 and float(r16.abs().max()) < 65504.0
    prod = r16.double()[:, None] * c16.double()[None, :]
    ref = row[:, None] * col[None, :]
    assert torch.allclose(prod[:, 1], ref[:, 1], rtol=1e-3)  # the big column is not clamped
    assert float(prod[0, 0]) == pytest.approx(float(ref[0, 0]), rel=0.05)  # the subnormal one


def test_fp16_balance_unchanged_when_everything_fits():
    row = torch.tensor([0.5, 1e-3, 2.0], dtype=torch.float64)
    col = torch.tensor([3e-4, 7.0, 0.0], dtype=torch.float64)
    r16, c16, k = fp16_balance(row, col, torch.full((3, 3), 5.0, dtype=torch.float64))
    assert k == 0
    assert torch.equal(r16, row.to(torch.float16).float())
    assert torch.equal(c16, col.to(torch.float16).float())


def test_rtn_row_far_below_the_others_is_zeroed_not_clamped():
    # Row RMS 1 and 1e-12: row scales span ~40 binades. The tiny row is negligible next to the
    # others (its entries are 1e-12 of theirs) and becomes exactly 0, codes included; the other
    # rows keep their accuracy (the old midpoint shift clamped them to 65504).
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    w[3] *= 1e-12
    q = rtn_quantize(w, bits=6.0)
    assert _no_subnormal(q.row_scale) and _no_subnormal(q.col_scale)
    assert float(q.row_scale[3]) == 0.0 and int(q.codes[3].abs().max()) == 0
    others = torch.arange(16) != 3
    e = (w - q.dequantize().double())[others]
    assert float((e * e).sum() / (w[others] ** 2).sum()) < 0.02
    assert FP16_RESOLUTION == 2.0**-11


# --- 2. entropy targets capped at log2(a · n_live) -------------------------------------------


def test_entropy_target_is_capped_with_a_warning(caplog):
    assert max_entropy_bits(4, 8) == 5.0
    with caplog.at_level(logging.WARNING, logger="watersic_hf.algorithm.search"):
        h = entropy_target(16.0, 4, 8, 0, "live")
    assert h == 5.0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "4x8" in msg and "capping" in msg and "5" in msg
    # Dead columns: the cap counts live columns only.
    assert entropy_target(16.0, 4, 8, 2, "original") == pytest.approx(math.log2(4 * 6))
    # Normal targets are untouched.
    assert entropy_target(3.0, 4096, 4096, 0, "live") == pytest.approx(3.0 - 32 / 4096)
    with pytest.raises(ValueError, match="n_live=0"):
        max_entropy_bits(4, 0)


@pytest.mark.parametrize("method", ["watersic", "gptq_entropy", "rtn"])
def test_small_layer_with_a_huge_target_is_capped(method):
    gen = torch.Generator().manual_seed(1)
    a, n = 6, 8
    w = torch.randn(a, n, generator=gen, dtype=torch.float64)
    x = torch.randn(64, n, generator=gen, dtype=torch.float64)
    sigma = x.T @ x / 64
    if method == "rtn":
        q = rtn_quantize(w, sigma, bits=16.0)
    else:
        fn = watersic_quantize if method == "watersic" else gptq_entropy_quantize
        q = fn(w, sigma, bits=16.0)
    cap = math.log2(a * n)
    assert q.entropy_target == pytest.approx(cap)
    # The search gets close to the cap (all codes distinct) with a sane step instead of driving
    # the nominal rate to its clamp (uncapped, it chased 11.3 bits up to rho = 24).
    assert cap - 0.15 <= q.entropy_bits() <= cap + 1e-9
    assert max(rho for rho, _ in q.search_history) < 12.0
    assert int(q.codes.abs().max()) < 2**16
    assert torch.isfinite(q.dequantize()).all()


def test_rate_control_never_hands_a_layer_more_than_its_codes_carry():
    rc = RateControl(bits=16.0, total_weights=1_000_000)
    bits, target = rc.target(4, 8, 0)
    assert target == "live" and bits == pytest.approx(max_live_rate_bits(4, 8)) and bits < 16
    bits, _ = rc.target(4, 8, 2)
    assert bits == pytest.approx(math.log2(4 * 6) + 16 / 6 + 16 / 4)
    # A big layer is not affected.
    assert rc.target(512, 512, 0)[0] == pytest.approx(16.0)
    assert RateControl(bits=16.0, total_weights=100, enabled=False).target(4, 8, 0) == (16.0,
                                                                                      "original")


# --- 3. singular systems ---------------------------------------------------------------------


def _duplicated_sigma(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, n, generator=gen, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # two identical input features
    x[:, 5] = 2.0 * x[:, 4] - x[:, 3]  # and a linear dependency
    return x.T @ x / 256


@pytest.mark.parametrize("method", ["watersic", "gptq_entropy"])
def test_rank_deficient_sigma_with_no_damping(method, caplog):
    n = 16
    sigma = _duplicated_sigma(n, 2)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, n, generator=gen, dtype=torch.float64)
    w[7] = 0.0  # an all-zero row
    w[:, 9] = 0.0  # and an all-zero column
    fn = watersic_quantize if method == "watersic" else gptq_entropy_quantize
    with caplog.at_level(logging.WARNING):
        q = fn(w, sigma, bits=4.0, damp=0.0)
    assert "Cholesky failed at damp=0" in caplog.text  # damped_cholesky raised the damping
    for t in (q.codes, q.row_scale, q.col_scale, q.dequantize()):
        assert torch.isfinite(t.double()).all()
    assert int(q.codes[7].abs().max()) == 0 and int(q.codes[:, 9].abs().max()) == 0
    assert _rel_wmse(w, q, sigma) < 0.05  # ~4 bits: far below the unquantized energy


def test_damped_cholesky_of_an_exactly_singular_matrix():
    sigma = _duplicated_sigma(8, 4)
    chol, delta = damped_cholesky(sigma, 0.0)
    assert delta > 0 and torch.isfinite(chol).all() and bool((chol.diagonal() > 0).all())
    assert torch.allclose(chol @ chol.T, sigma + delta * torch.eye(8, dtype=torch.float64),
                          atol=1e-12)


def test_spd_solve_falls_back_to_the_pseudo_inverse():
    # Exactly singular (and not PD): Cholesky fails and LU hits a zero pivot.
    mat = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rhs = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)
    x = _spd_solve(mat, rhs)
    assert torch.allclose(x, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))  # minimum norm
    assert torch.equal(_spd_solve(torch.zeros(3, 3, dtype=torch.float64), rhs), torch.zeros(3,
                       dtype=torch.float64))
    # A regular SPD system still takes the Cholesky path (exact answer).
    spd = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(_spd_solve(spd, torch.tensor([6.0, 5.0], dtype=torch.float64)),
                          torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_triangular_solve_overflow_uses_the_pseudo_inverse(caplog):
    chol = torch.tensor([[1.0, 0.0], [1.0, 1e-300]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1e10]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="watersic_hf.algorithm.stats"):
        y = _right_solve_lt(chol, b)
    assert "pseudo-inverse" in caplog.text
    assert torch.isfinite(y).all()
    # Regular case: exact triangular solve, no warning.
    good = torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    y = _right_solve_lt(good, torch.tensor([[4.0, 5.0]], dtype=torch.float64))
    assert torch.allclose(y @ good.T, torch.tensor([[4.0, 5.0]], dtype=torch.float64))


def test_rescalers_with_duplicated_features_and_an_indefinite_sigma():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(32, 6, generator=gen, dtype=torch.float64).round()
    w0[:, 1] = w0[:, 0]
    w0[4] = 0.0
    sigma = _duplicated_sigma(6, 6)
    cross = w0 @ sigma + 0.01 * torch.randn(32, 6, generator=gen, dtype=torch.float64)
    res = fit_rescalers(w0, sigma, cross, 10.0, torch.ones(6, dtype=torch.float64))
    assert torch.isfinite(res.t).all() and torch.isfinite(res.gamma).all()
    assert all(b <= a + 1e-12 for a, b in zip(res.losses[:-1], res.losses[1:], strict=True))
    # An indefinite Σ (a user error the validation cannot see cheaply) still gives finite gains.
    bad = sigma.clone()
    bad[2, 2] = -1.0
    res = fit_rescalers(w0, bad, cross, 10.0, torch.ones(6, dtype=torch.float64))
    assert torch.isfinite(res.t).all() and torch.isfinite(res.gamma).all()


# --- 4. final finite check -------------------------------------------------------------------


def _layer(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(128, 16, generator=gen, dtype=torch.float64)
    return w, x.T @ x / 128


def test_nan_from_the_rescalers_is_refused(monkeypatch):
    w, sigma = _layer()

    def nan_rescalers(w0, *args, **kwargs):
        g = torch.ones(w0.shape[1], dtype=torch.float64)
        g[3] = float("nan")
        return RescalerResult(t=torch.ones(w0.shape[0], dtype=torch.float64), gamma=g)

    monkeypatch.setattr(api, "fit_rescalers", nan_rescalers)
    with pytest.raises(ValueError, match=r"watersic quantization of a 32x16 layer .*col_scale.*"
                                         r"raise damp"):
        watersic_quantize(w, sigma, step=0.1)


def test_nan_codes_are_refused(monkeypatch):
    w, sigma = _layer()
    real = api.zsic

    def nan_zsic(*args, **kwargs):
        z, g = real(*args, **kwargs)
        z[0, 0] = float("nan")
        return z, g

    monkeypatch.setattr(api, "zsic", nan_zsic)
    with pytest.raises(ValueError, match=r"gptq_entropy quantization of a 32x16 layer produced 1 "
                                         r"non-finite code"):
        gptq_entropy_quantize(w, sigma, step=0.1)


def test_rtn_nan_scale_and_int32_overflow_are_refused(monkeypatch):
    w, _ = _layer()
    with pytest.raises(ValueError, match=r"rtn quantization of a 32x16 layer produced codes beyond "
                                         r"int32.*larger step"):
        rtn_quantize(w, step=1e-12)
    real = api.fp16_balance

    def nan_balance(row, col, codes=None):
        r, c, k = real(row, col, codes)
        r[2] = float("nan")
        return r, c, k

    monkeypatch.setattr(api, "fp16_balance", nan_balance)
    with pytest.raises(ValueError, match=r"rtn quantization of a 32x16 layer .*row_scale"):
        rtn_quantize(w, bits=3.0)
