"""Automatic damping (issue 12): each group's damping is chosen on held-out calibration windows."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import watersic_hf
from watersic_hf.integration import calibrate as calib
from watersic_hf.integration.engine.context import LayerStats
from watersic_hf.integration.engine.damping import choose_damp, holdout_batches
from watersic_hf.integration.engine.group_quantizer import GroupQuantizer, output_error_parts
from watersic_hf.integration.engine.observers import RateControl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))

import make_calib_codes as golden  # noqa: E402


def test_holdout_batches_are_spread_and_keep_one():
    assert holdout_batches(1, 0.25) == []
    assert holdout_batches(8, 0.0) == []
    assert holdout_batches(2, 0.5) == [1]
    held = holdout_batches(64, 0.25)
    assert len(held) == 16 and len(set(held)) == 16
    assert min(held) < 8 and max(held) > 56  # spread over the whole list, not one end
    assert holdout_batches(3, 0.5) == [0, 2] or len(holdout_batches(3, 0.5)) == 2
    for n in range(2, 20):
        assert 1 <= len(holdout_batches(n, 0.5)) <= n - 1


def _moments(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def _choice(tokens_fit: int, seed: int = 0):
    """A 64-input layer whose inputs live mostly in a few directions (like real activations):
    ``tokens_fit`` tokens to fit, 4096 independent tokens to judge."""
    g = torch.Generator().manual_seed(seed)
    n, a = 64, 96
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    spectrum = torch.logspace(0, -3, n, dtype=torch.float64)
    basis = torch.linalg.qr(mix).Q * spectrum.sqrt()

    def draw(t: int) -> torch.Tensor:
        return torch.randn(t, n, generator=g, dtype=torch.float64) @ basis.T

    fit = LayerStats(_moments(draw(tokens_fit)))
    held = LayerStats(_moments(draw(4096)))
    lin = nn.Linear(n, a, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(a, n, generator=g, dtype=torch.float64))
    cfg = watersic_hf.WaterSICConfig(bits=3, drift=False, residual_compensation=False,
                                     attention_weighted=False)
    quantizer = GroupQuantizer(cfg, RateControl(3.0, a * n, enabled=False), [])
    ctx = SimpleNamespace(linears={"proj": lin}, name="block")
    return choose_damp(quantizer, ctx, ("proj",), fit, held), lin, fit, held, quantizer


def test_scarce_data_gets_more_damping_than_plenty():
    """Fewer tokens than inputs leave directions unseen: the held-out optimum moves to strong
    damping. With 100x more tokens than inputs the optimum is weak damping (not zero: some
    damping also helps the greedy rounding with exact statistics)."""
    scarce, *_ = _choice(tokens_fit=48)
    plenty, *_ = _choice(tokens_fit=8192)
    assert scarce.damp >= 0.3, scarce.trials
    assert plenty.damp <= 0.1, plenty.trials
    assert scarce.damp >= 10 * plenty.damp, (scarce.trials, plenty.trials)


def test_chosen_damping_minimises_the_held_out_error_it_reports():
    choice, lin, fit, held, quantizer = _choice(tokens_fit=48)
    assert choice.trials[choice.damp] == min(choice.trials.values())
    assert len(choice.trials) >= 5  # the decade grid plus its refinement
    # Quantizing the whole layer at the chosen damping beats the old fixed 1e-4 held out.
    w = lin.weight.detach()

    def held_err(damp: float) -> float:
        prepared = quantizer.prepare(fit, w, damp=damp)
        q = quantizer._quantize(w, fit, prepared, 3.0, "original", damp=damp)
        err, ref = output_error_parts(w, q.dequantize(), held)
        return err / ref

    assert held_err(choice.damp) < 0.5 * held_err(1e-4)


def _calibrate(**kw):
    from _tiny import make_tiny_model

    model = make_tiny_model("llama")
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=golden.calibration_ids(),
                                     seqlen=golden.SEQLEN, nsamples=golden.NSAMPLES, **kw)
    return calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])


def test_default_calibration_reports_damping_and_held_out_error(one_thread):
    res = _calibrate()
    assert res.reports
    for r in res.reports:
        assert r.damp is not None and 1e-5 <= r.damp <= 10.0
        assert r.heldout_rel_err is not None and r.heldout_rel_err >= 0.0
    # One damping per group: q/k/v share theirs.
    by_name = {r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]: r for r in
               res.reports if ".layers.0." in r.name}
    assert len({by_name[k].damp for k in ("self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj")}) == 1


def test_a_given_damp_wins(one_thread):
    res = _calibrate(damp=0.05)
    assert {r.damp for r in res.reports} == {0.05}
    assert all(r.heldout_rel_err is None for r in res.reports)


def test_one_batch_falls_back_to_the_fixed_damping_with_a_warning(one_thread, caplog):
    from _tiny import make_tiny_model

    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=golden.calibration_ids()[:1],
                                     seqlen=golden.SEQLEN, nsamples=1)
    with caplog.at_level(logging.WARNING, logger="watersic_hf"):
        res = calib.calibrate_model(make_tiny_model("llama"), cfg,
                                    modules_to_not_convert=["lm_head"])
    assert "automatic damping needs at least 2" in caplog.text
    assert {r.damp for r in res.reports} == {cfg.effective_damp}


def test_config_holdout_fraction_is_checked():
    assert watersic_hf.WaterSICConfig().auto_damp
    assert not watersic_hf.WaterSICConfig(damp=1e-4).auto_damp
    assert not watersic_hf.WaterSICConfig(method="rtn").auto_damp
    with pytest.raises(ValueError, match="holdout_fraction"):
        watersic_hf.WaterSICConfig(holdout_fraction=0.0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        watersic_hf.WaterSICConfig(holdout_fraction=0.75)


# ------------------------------------------------------------------ adaptive (eps_q, eps_a)


@pytest.mark.parametrize("optimum", [(0.3, 0.7), (0.0, 0.01), (0.85, 0.2)])
def test_eps_search_finds_a_known_optimum(optimum):
    """The coordinate golden-section search lands within its final bracket of the minimum of a
    separable bowl whose answer is known."""
    from watersic_hf.integration.engine.policy import search_eps

    calls = []

    def err(eq: float, ea: float) -> float:
        calls.append((eq, ea))
        return (eq - optimum[0]) ** 2 + 2.0 * (ea - optimum[1]) ** 2 + 1.0

    best = search_eps(err, steps=8)
    bracket = 0.618 ** 8  # width of the final golden-section bracket on [0, 1]
    assert abs(best[0] - optimum[0]) <= bracket
    assert abs(best[1] - optimum[1]) <= bracket
    assert len(calls) == len(set(calls)) <= 2 * (8 + 3) + 3  # no point evaluated twice


def test_adaptive_eps_searches_on_held_out_batches_with_automatic_damping(one_thread, caplog):
    """On a real block the search runs on the held-out batches and its damping comes from the
    automatic choice at the fixed mix."""
    import re

    with caplog.at_level(logging.INFO, logger="watersic_hf"):
        res = _calibrate(adaptive_eps=True, adaptive_eps_steps=2)
    chosen = re.findall(r"chose eps_q=([0-9.]+) eps_a=([0-9.]+) .*on held-out batches",
                        caplog.text)
    assert len(chosen) == 2  # one per block, measured on held-out batches
    for eq, ea in chosen:
        assert 0.0 <= float(eq) <= 1.0 and 0.0 <= float(ea) <= 1.0
    assert all(r.damp is not None for r in res.reports)


def test_held_out_score_equals_the_output_error_formula():
    """The per-candidate shortcut (constant terms computed once) gives the same error as
    :func:`output_error_parts` with drift statistics."""
    from watersic_hf.integration.engine.damping import _HeldOutScore

    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64)
    xh = x + 0.1 * torch.randn(500, 24, generator=g, dtype=torch.float64)
    stats = LayerStats(_moments(x), _moments(xh), x.T @ xh / 500)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    score = _HeldOutScore(w, stats)
    for scale in (0.01, 0.1):
        q = w + scale * torch.randn(10, 24, generator=g, dtype=torch.float64)
        err, ref = output_error_parts(w, q, stats)
        assert score(q) == pytest.approx(err, rel=1e-4)
        assert score.ref == pytest.approx(ref, rel=1e-5)


def test_cli_summary_reports_held_out_error_and_damping(capsys):
    from watersic_hf.cli import _error_summary, _print_quantize_summary

    layers = {
        "a.q_proj": {"rel_err": 0.01, "heldout_rel_err": 0.02, "damp": 0.1},
        "a.down_proj": {"rel_err": 0.03, "heldout_rel_err": 0.09, "damp": 1.0},
    }
    errs = _error_summary(layers)
    assert errs["rel_err_mean"] == pytest.approx(0.02)
    assert errs["heldout_rel_err_mean"] == pytest.approx(0.055)
    assert errs["heldout_rel_err_worst"] == "a.down_proj" and errs["heldout_rel_err_max"] == 0.09
    assert (errs["damp_min"], errs["damp_max"]) == (0.1, 1.0)
    assert _error_summary({"x": {"rel_err": 0.5}}) == {"rel_err_mean": 0.5}  # fixed damping
    summary = {"out": "o", "model": "m", "method": "watersic", "storage": "entropy",
               "bits_target": 3.0, "nsamples": 4, "seqlen": 32, "dataset": "d", "device": "cpu",
               "layers": 2, "quantize_seconds": 1.0, "total_seconds": 2.0, **errs}
    _print_quantize_summary(summary)
    out = capsys.readouterr().out
    assert "0.055 mean on held-out windows, worst 0.09 (a.down_proj)" in out
    assert "damping 0.1-1" in out
