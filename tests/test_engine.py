"""The staged calibration engine (issue 11): same codes as before, fewer passes, clear parts."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from watersic_hf import algorithm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))

import make_calib_codes as golden  # noqa: E402

with open(os.path.join(HERE, "golden", "calib_codes_v1.json")) as _f:
    REFERENCE = json.load(_f)


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_codes_match_reference(case, one_thread):
    """Codes and scales of every layer equal those of the engine before issue 11 (aa2255d)."""
    got = golden.fingerprint(case)
    ref = REFERENCE[case]
    assert sorted(got["layers"]) == sorted(ref["layers"])
    changed = [name for name, fp in got["layers"].items() if fp != ref["layers"][name]]
    assert not changed, f"{case}: codes or scales changed in {changed}"
    assert got["achieved_bits"] == pytest.approx(ref["achieved_bits"], abs=1e-9)


# ---------------------------------------------------------- statistics factored once per group


def _group_stats(n: int = 24, dead: int = 0):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, n, generator=g, dtype=torch.float64)
    x[:, :dead] = 0.0
    xh = x + 0.05 * torch.randn(300, n, generator=g, dtype=torch.float64)
    return x.T @ x / 300, xh.T @ xh / 300, x.T @ xh / 300


@pytest.mark.parametrize("dead", [0, 3])
@pytest.mark.parametrize("method", ["watersic", "gptq"])
def test_prepared_statistics_give_identical_codes(method, dead):
    sx, sxh, sxxh = _group_stats(dead=dead)
    quantize = getattr(algorithm, f"{method}_quantize")
    prep = algorithm.prepare_statistics(sx, sigma_xhat=sxh, sigma_x_xhat=sxxh, damp=1e-3)
    assert prep.n_dead == dead and (prep.keep is None) == (dead == 0)
    g = torch.Generator().manual_seed(6)
    for rows in (8, 16):  # two layers of one group share the prepared statistics
        w = torch.randn(rows, 24, generator=g)
        sres = 0.01 * torch.randn(rows, 24, generator=g, dtype=torch.float64)
        kw = dict(sigma_xhat=sxh, sigma_x_xhat=sxxh, sigma_residual=sres, damp=1e-3)
        a = quantize(w, sx, 3.0, **kw)
        b = quantize(w, sx, 3.0, prepared=prep, **kw)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.col_scale, b.col_scale) and torch.equal(a.row_scale, b.row_scale)


def test_prepared_statistics_refuse_other_inputs():
    sx, sxh, sxxh = _group_stats()
    prep = algorithm.prepare_statistics(sx, sigma_xhat=sxh, sigma_x_xhat=sxxh)
    w = torch.randn(4, 24)
    with pytest.raises(ValueError, match="made from other statistics"):
        algorithm.watersic_quantize(w, sx.clone(), 3.0, sigma_xhat=sxh, sigma_x_xhat=sxxh,
                                    prepared=prep)
    with pytest.raises(ValueError, match="damp=0.0001.*damp=0.01"):
        algorithm.watersic_quantize(w, sx, 3.0, sigma_xhat=sxh, sigma_x_xhat=sxxh, damp=0.01,
                                    prepared=prep)
    with pytest.raises(ValueError, match="the weight needs"):
        algorithm.prepare_statistics(sx, n=12)
    with pytest.raises(TypeError, match="prepare_statistics"):
        algorithm.watersic_quantize(w, sx, 3.0, prepared=object())
