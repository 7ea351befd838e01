"""Standard GPTQ (method="gptq"): the algorithm, its storage with group scales, end to end."""

from __future__ import annotations

import math

import pytest
import torch

from watersic_hf.algorithm import gptq_entropy_quantize, gptq_quantize
from watersic_hf.algorithm.gptq import check_gptq_bits


def _problem(a: int = 12, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated, unevenly scaled input second moment."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.2
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) @ (torch.eye(n) + mix)
    x = x * torch.linspace(0.2, 3.0, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    sigma = x.T @ x / x.shape[0]
    w = torch.randn(a, n, generator=gen, dtype=torch.float64)
    return w, sigma


def _herr(w: torch.Tensor, wq: torch.Tensor, sigma: torch.Tensor) -> float:
    d = w.double() - wq.double()
    return float(torch.einsum("ij,jk,ik->", d, sigma.double(), d))


def _stored_scales(scale: torch.Tensor) -> torch.Tensor:
    """The scale as gptq.py stores it: power-of-two row times fp16 group value."""
    row = torch.pow(2.0, torch.ceil(torch.log2(scale.amax(1))))
    return row[:, None] * (scale / row[:, None]).half().double()


def _reference_gptq(w: torch.Tensor, sigma: torch.Tensor, bits: int, g: int, act_order: bool,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook GPTQ in plain loops (no lazy blocks, no vectorisation), as in the paper's
    Algorithm 1 with AutoGPTQ's grid; returns (codes, dequantized weight)."""
    a, n = w.shape
    maxq = 2**bits - 1
    h = sigma.clone()
    h += damp * float(h.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    order = (sorted(range(n), key=lambda j: -float(sigma[j, j])) if act_order
             else list(range(n)))
    hinv = torch.linalg.inv(h)[order][:, order]
    u = torch.linalg.cholesky(hinv, upper=True)
    work = w[:, order].clone()
    n_groups = -(-n // g)
    scale = torch.zeros(a, n_groups, dtype=torch.float64)
    if act_order:  # static groups from the original weights
        for r in range(a):
            for k in range(n_groups):
                m = max(abs(float(w[r, j])) for j in range(k * g, min(n, (k + 1) * g)))
                scale[r, k] = 2 * (m if m > 0 else 1.0) / maxq
        scale = _stored_scales(scale)
    codes = torch.zeros(a, n, dtype=torch.int64)
    row_pow = None
    for p in range(n):
        j = order[p]
        k = j // g
        if not act_order and j % g == 0:  # dynamic group: current (error-fed) weights
            fresh = torch.zeros(a, dtype=torch.float64)
            for r in range(a):
                m = max(abs(float(work[r, q])) for q in range(p, min(n, p + g)))
                fresh[r] = 2 * (m if m > 0 else 1.0) / maxq
            if row_pow is None:
                row_pow = torch.pow(2.0, torch.ceil(torch.log2(fresh)))
            scale[:, k] = row_pow * (fresh / row_pow).half().double()
        for r in range(a):
            s = float(scale[r, k])
            c = min(max(round(float(work[r, p]) / s), -(maxq + 1) // 2), maxq // 2)
            codes[r, j] = c
            e = (float(work[r, p]) - c * s) / float(u[p, p])
            for q in range(p + 1, n):
                work[r, q] -= e * float(u[p, q])
    deq = codes.double() * scale.repeat_interleave(g, dim=1)[:, :n]
    return codes, deq


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_a_plain_loop_reference(act_order):
    w, sigma = _problem(a=5, n=24, seed=1)
    q = gptq_quantize(w, sigma, 3, group_size=8, act_order=act_order, block_size=5,
                      dead_threshold=0.0)
    codes, deq = _reference_gptq(w, sigma, 3, 8, act_order)
    assert torch.equal(q.codes.long(), codes)
    torch.testing.assert_close(q.dequantize().double(), deq, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (0, False),
                                                  (-1, True), (128, False)])
def test_grid_scales_and_error_below_rtn(bits, group_size, act_order):
    w, sigma = _problem()
    a, n = w.shape
    q = gptq_quantize(w, sigma, bits, group_size=group_size, act_order=act_order)
    assert q.method == "gptq" and q.code_bits == bits
    assert int(q.codes.min()) >= -(2 ** (bits - 1)) and int(q.codes.max()) <= 2 ** (bits - 1) - 1
    deq = q.dequantize()
    if group_size > 0 and group_size < n:
        assert q.group_scale is not None and q.group_size == group_size
        assert q.group_scale.shape == (a, math.ceil(n / group_size))
        for t in (q.group_scale, q.row_scale):
            assert torch.equal(t.half().float(), t)  # what WaterSICLinear stores, exactly
        scale = q.row_scale[:, None].double() * q.group_scale.double()
        scale = scale.repeat_interleave(group_size, 1)[:, :n]
    else:  # per-channel (96 < 128 columns: one group is per-channel as well)
        assert q.group_scale is None and q.group_size == 0
        scale = (q.row_scale[:, None] * q.col_scale[None, :]).double()
    # RTN on the same grid, same scales
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rtn = torch.clamp(torch.round(w / scale), lo, hi) * scale
    assert _herr(w, deq, sigma) < _herr(w, rtn, sigma)
    # the fixed-width rate: bits per live code plus 16 bits per stored scale
    groups = 0 if q.group_scale is None else q.group_scale.numel()
    assert q.rate_bits == pytest.approx(bits + 16 * (a + n + groups) / (a * n))


def test_act_order_changes_the_order_and_still_dequantizes():
    w, sigma = _problem(seed=3)
    plain = gptq_quantize(w, sigma, 4, group_size=32, act_order=False)
    act = gptq_quantize(w, sigma, 4, group_size=32, act_order=True)
    assert not torch.equal(plain.codes, act.codes)
    # static groups: scales from the original weights, by ORIGINAL column index
    wmax = w.abs().reshape(w.shape[0], -1, 32).amax(2)
    torch.testing.assert_close((act.row_scale[:, None] * act.group_scale).double(),
                               _stored_scales(2 * wmax / 15), rtol=0, atol=0)
    deq = act.row_scale[:, None].double() * act.codes.double() * act.group_scale.double(
    ).repeat_interleave(32, 1)
    torch.testing.assert_close(act.dequantize().double(), deq)
    assert _herr(w, act.dequantize(), sigma) < 1.5 * _herr(w, plain.dequantize(), sigma)


def test_dead_columns_and_prepared_statistics():
    from watersic_hf.algorithm import prepare_statistics

    w, sigma = _problem(seed=4)
    sigma[5, :] = 0
    sigma[:, 5] = 0
    q = gptq_quantize(w, sigma, 4, group_size=32)
    assert q.dead_columns.tolist() == [5]
    assert not q.codes[:, 5].any() and float(q.col_scale[5]) == 0.0
    prep = prepare_statistics(sigma, damp=0.01)
    again = gptq_quantize(w, sigma, 4, group_size=32, prepared=prep)
    assert torch.equal(again.codes, q.codes)


@pytest.mark.parametrize("bad", [2.5, 1, 9, 0, "4", True, float("nan")])
def test_bad_bits_are_refused(bad):
    with pytest.raises(ValueError, match="gptq_entropy"):
        check_gptq_bits(bad)
    w, sigma = _problem(a=2, n=8)
    with pytest.raises(ValueError, match="whole number of bits"):
        gptq_quantize(w, sigma, bad)


def test_bad_group_size_is_refused():
    w, sigma = _problem(a=2, n=8)
    with pytest.raises(ValueError, match="group_size=-2"):
        gptq_quantize(w, sigma, 4, group_size=-2)


def test_gptq_entropy_is_the_old_entropy_coded_variant():
    w, sigma = _problem()
    q = gptq_entropy_quantize(w, sigma, 2.5)
    assert q.method == "gptq_entropy" and q.group_scale is None and q.code_bits is None
    assert q.rate_bits == pytest.approx(2.5, abs=0.1)


# ---------------------------------------------------------------------------- the module
@pytest.mark.parametrize("fmt", ["plain", "packed"])
def test_linear_with_group_scales(fmt):
    from watersic_hf.nn import WaterSICLinear

    w, sigma = _problem(a=24, n=80, seed=5)
    q = gptq_quantize(w.float(), sigma, 4, group_size=32)
    bias = torch.randn(24)
    lin = WaterSICLinear.from_quantized(q, bias, format=fmt)
    assert lin.layout_metadata()["scale_group_size"] == 32
    assert lin.weight_group_scale.dtype == torch.float16 and lin.weight_group_scale.shape == (24, 3)
    torch.testing.assert_close(lin.dequantize().weight, q.dequantize(), rtol=0, atol=0)
    x = torch.randn(5, 80)
    torch.testing.assert_close(lin(x), x @ q.dequantize().T + bias, rtol=1e-5, atol=1e-5)
    # the group scales are counted in memory: 16 bits each
    plain = WaterSICLinear.from_quantized(
        type("Q", (), {"codes": q.codes, "col_scale": q.col_scale, "row_scale": q.row_scale})(),
        None, format=fmt)
    assert lin.bits_in_memory - plain.bits_in_memory == pytest.approx(16 * 3 / 80)
    # casts keep the scales fp16 (a storage format), the skeleton rebuilds the same shapes
    half = lin.half()
    assert half.weight_group_scale.dtype == torch.float16
    skeleton = WaterSICLinear(80, 24, True, lin.layout_metadata(), device="meta")
    assert skeleton.weight_group_scale.shape == (24, 3)


def test_linear_refuses_a_bad_group_layout():
    from watersic_hf.nn import WaterSICLinear

    with pytest.raises(ValueError, match="scale_group_size"):
        WaterSICLinear(8, 4, False, {"format": "plain", "version": 1, "scale_group_size": 0})
    w, sigma = _problem(a=4, n=16)
    q = gptq_quantize(w.float(), sigma, 4, group_size=8)
    q.group_size = 4  # shape (4, 2) no longer matches ceil(16 / 4) = 4 groups
    with pytest.raises(ValueError, match="group_scale has shape"):
        WaterSICLinear.from_quantized(q, None)


def test_vllm_plugin_refuses_grouped_layers():
    # the check WaterSICVllmConfig.from_config runs first (plain torch, no vLLM needed)
    from watersic_hf.vllm.sharding import refuse_grouped_layers

    layers = {"model.layers.0.mlp.down_proj": {"in": 128, "out": 64, "bias": False,
                                               "layout": {"format": "packed",
                                                          "scale_group_size": 128}},
              "model.layers.0.mlp.up_proj": {"in": 64, "out": 128, "bias": False,
                                             "layout": {"format": "packed"}}}
    with pytest.raises(ValueError, match=r"1 layer\(s\) .*per-group scales.*down_proj"):
        refuse_grouped_layers(layers)
    refuse_grouped_layers({"a": layers["model.layers.0.mlp.up_proj"]})


# ---------------------------------------------------------------------------- end to end
def _quantize_tiny(tmp_path, **kw):
    from _tiny import make_local_tokenizer, make_tiny_model
    from transformers import AutoModelForCausalLM

    from watersic_hf import WaterSICConfig

    src = tmp_path / "src"
    if not src.exists():
        make_tiny_model("llama", src)
        make_local_tokenizer(src)
    ids = [torch.arange(16) % 100 + i for i in range(2)]
    cfg = WaterSICConfig(dataset=ids, seqlen=16, device="cpu", **kw)
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)


@pytest.mark.parametrize("group_size,act_order", [(32, True), (0, False)])
def test_tiny_model_end_to_end(tmp_path, group_size, act_order):
    from transformers import AutoModelForCausalLM

    import watersic_hf

    model = _quantize_tiny(tmp_path, method="gptq", bits=4, gptq_group_size=group_size,
                           gptq_act_order=act_order)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, watersic_hf.WaterSICLinear)
    assert (q_proj.layout_metadata().get("scale_group_size") == (group_size or None))
    cfg = model.config.quantization_config
    n_weights = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, watersic_hf.WaterSICLinear))
    # the fixed rate is charged: 4 bits plus the scales (more than 4, never the rate target)
    assert cfg.achieved_bits > 4.0
    assert cfg.achieved_bits < 4.0 + 16 * 3 / 32 + 0.6
    x = torch.arange(8)[None]
    with torch.no_grad():
        ref = model(x).logits
    codes = q_proj.codes()
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    for storage in ("packed", "entropy"):
        cfg.storage = storage
        out = tmp_path / storage
        model.save_pretrained(out)
        again = AutoModelForCausalLM.from_pretrained(out)
        mod = again.model.layers[0].self_attn.q_proj
        assert isinstance(mod, watersic_hf.WaterSICLinear)
        if group_size:
            assert torch.equal(mod.weight_group_scale, q_proj.weight_group_scale)
        assert torch.equal(mod.codes(), codes)
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, ref, rtol=0, atol=0)
        rep = watersic_hf.report(again)
        mem = sum(m.bits_in_memory * m.in_features * m.out_features for m in again.modules()
                  if isinstance(m, watersic_hf.WaterSICLinear)) / n_weights
        assert rep["bits_in_memory"] == pytest.approx(mem, rel=1e-5)
        assert rep["bits_on_disk"] > 0


def test_tiny_model_gptq_entropy_and_an_old_gptq_checkpoint(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    model = _quantize_tiny(tmp_path, method="gptq_entropy", bits=2.5)
    assert model.config.quantization_config.achieved_bits == pytest.approx(2.5, abs=0.05)
    model.save_pretrained(tmp_path / "q")
    # a checkpoint written before the rename says method="gptq" with fractional bits: the method
    # is informational at load time, so it loads as before
    path = tmp_path / "q" / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["method"] = "gptq"
    for key in ("gptq_group_size", "gptq_act_order"):
        data["quantization_config"].pop(key)
    path.write_text(json.dumps(data))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.method == "gptq"
    x = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    ({"bits": 2.5}, "whole number of bits"),
    ({"bits": 10}, "whole number of bits"),
    ({"bits": 4, "gptq_group_size": -3}, "gptq_group_size"),
    ({"bits": 4, "gptq_act_order": 1}, "gptq_act_order"),
])
def test_config_refuses_bad_gptq_settings(kw, match):
    from watersic_hf import WaterSICConfig

    with pytest.raises((ValueError, TypeError), match=match):
        WaterSICConfig(method="gptq", **kw)
    if "bits" in kw and kw["bits"] == 2.5:
        assert WaterSICConfig(method="gptq_entropy", bits=2.5).effective_damp == 0.01
