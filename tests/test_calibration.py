"""Each piece of the calibration pipeline against a plain, explicit counterpart on a small case."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model

import watersic_hf
from watersic_hf import algorithm
from watersic_hf.integration import calibrate as calib
from watersic_hf.integration.attention import install_probe, received_attention, set_sink
from watersic_hf.integration.blocks import (
    capture_block_inputs,
    discover_groups,
    find_decoder_blocks,
    move_to,
)
from watersic_hf.integration.data import calibration_windows, make_batches
from watersic_hf.integration.rate_control import RateController
from watersic_hf.integration.replace import quantizable_linears, should_convert_module
from watersic_hf.integration.stats import MomentAccumulator, attention_importance

VOCAB = 128


def _random_ids(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------- statistics


def test_moment_accumulator_matches_explicit_products():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 6, generator=g) for _ in range(4)]  # 4 batches of (B=3, T=5, n=6)
    ys = [torch.randn(3, 5, 4, generator=g) for _ in range(4)]
    ws = [torch.rand(3, 5, generator=g) for _ in range(4)]
    f64 = torch.float64
    auto = MomentAccumulator(6, 6, "cpu", f64)
    cross = MomentAccumulator(4, 6, "cpu", f64)
    weighted = MomentAccumulator(6, 6, "cpu", f64)
    fast = MomentAccumulator(6, 6, "cpu")  # fp32 products on the CPU, fp64 sum
    for x, y, w in zip(xs, ys, ws, strict=True):
        auto.add(x.float())
        cross.add(y, x)
        weighted.add(x, weight=w)
        fast.add(x)
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    Y = torch.cat([y.reshape(-1, 4) for y in ys]).double()
    W = torch.cat([w.reshape(-1) for w in ws]).double()
    n = X.shape[0]
    assert auto.get().dtype == torch.float64
    torch.testing.assert_close(auto.get(), X.T @ X / n)
    torch.testing.assert_close(cross.get(), Y.T @ X / n)
    # Weighted moments are normalised by the token count, not by the sum of the weights.
    torch.testing.assert_close(weighted.get(), (X * W[:, None]).T @ X / n)
    assert fast.product_dtype == torch.float32 and fast.get().dtype == torch.float64
    torch.testing.assert_close(fast.get(), X.T @ X / n, rtol=1e-6, atol=1e-6)


def test_attention_importance_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    b, h, t = 2, 3, 7
    scores = torch.randn(b, h, t, t, generator=g)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    naive = torch.zeros(b, t)
    for bi in range(b):
        for j in range(t):
            naive[bi, j] = sum(
                sum(probs[bi, hh, i, j] for i in range(j, t)) / (t - j) for hh in range(h)
            ) / h
    torch.testing.assert_close(attention_importance(probs), naive)


def test_probe_received_attention_matches_eager_probabilities():
    model = make_tiny_model("llama", attn_implementation="eager")
    ids = _random_ids(2, 9, seed=3)
    batch = torch.stack(ids)
    with torch.no_grad():
        ref = model(batch, output_attentions=True)
    probs = ref.attentions[1]  # (B, H, T, T) of the second block
    block = copy.deepcopy(model.model.layers[1])
    configs = install_probe(block)
    assert configs and configs[0] is not model.config  # the user's config is never touched
    got = []
    set_sink(configs, lambda r, heads: got.append((r, heads)))
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, [batch], "cpu")
    with torch.no_grad():
        hidden = model.model.layers[0](inputs.hidden[0], **inputs.block_kwargs(0, 0))
        out_probe = block(hidden, **inputs.block_kwargs(1, 0))
        out_plain = model.model.layers[1](hidden, **inputs.block_kwargs(1, 0))
    received, heads = got[0]
    assert heads == probs.shape[1]
    torch.testing.assert_close(received, probs.sum(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_probe, out_plain)  # the probe delegates, outputs unchanged


def test_received_attention_sliding_window_and_softcap():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 6, 8, generator=g)
    k = torch.randn(1, 2, 6, 8, generator=g)
    module = torch.nn.Module()
    got = received_attention(module, q, k, None, scaling=0.3, softcap=2.0, sliding_window=3)
    kk = k.repeat_interleave(2, dim=1)
    s = torch.tanh(q @ kk.transpose(-1, -2) * 0.3 / 2.0) * 2.0
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    s = s.masked_fill(~((j <= i) & (j > i - 3)), float("-inf"))
    torch.testing.assert_close(got, s.softmax(-1).sum(dim=(1, 2)))


# ------------------------------------------------------------------------------------- rate control


def test_rate_controller_hits_global_target_and_passes_savings_on():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 3
    total = sum(a * n for a, n in shapes)
    rc = RateController(3.0, total)
    targets = []
    noise = 0.0
    for k, (a, n) in enumerate(shapes):
        dead = 8 if k % 5 == 1 else 0
        target = rc.target(a, n, dead)
        targets.append(target)
        # A layer spends its target on live weights, 16 bits per dead index, plus some noise.
        noise = 0.02 * float(torch.randn((), generator=g))
        rc.charge((target * a * (n - dead) + 16 * dead) / (a * n) + noise, a, n)
    # Earlier errors are corrected by later layers; only the last layer's noise remains.
    a, n = shapes[-1]
    assert abs(rc.achieved_bits - 3.0) <= abs(noise) * a * n / total + 1e-9
    assert max(targets) > 3.0  # dead columns made room for more bits elsewhere


def test_rate_control_end_to_end_and_streaming():
    model = make_tiny_model("llama")
    data = _random_ids(4, 16, seed=5)
    cfg = watersic_hf.WaterSICConfig(bits=2.5, dataset=data, seqlen=16, method="gptq_entropy",
                                     device="cpu")
    res = calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    assert abs(res.achieved_bits - 2.5) < 0.01
    rates = [r.bits for r in res.reports]
    weights = [r.rows * r.cols for r in res.reports]
    assert res.achieved_bits == pytest.approx(
        sum(b * w for b, w in zip(rates, weights, strict=True)) / sum(weights))
    assert res.reports[0].target_bits == pytest.approx(2.5)
    assert res.tokens == 64
    # Blocks went back to their home device, replaced by WaterSICLinear; lm_head kept.
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert sum(isinstance(m, watersic_hf.WaterSICLinear) for m in model.modules()) == 14
    assert type(model.lm_head) is torch.nn.Linear


# ------------------------------------------------------------------------------------- data


def test_calibration_windows_pack_texts(tiny_tokenizer_dir):
    tok = make_local_tokenizer()
    windows = calibration_windows(CALIB_TEXTS * 3, tok, nsamples=5, seqlen=12, seed=0)
    assert len(windows) == 5 and all(w.shape == (12,) for w in windows)
    stream = torch.cat(windows)
    assert len(set(stream.tolist())) > 10  # real text, not padding
    # Same seed, same windows; another seed shuffles the documents differently.
    again = calibration_windows(CALIB_TEXTS * 3, tok, nsamples=5, seqlen=12, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    other = calibration_windows(CALIB_TEXTS * 3, tok, nsamples=5, seqlen=12, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(windows, other, strict=True))
    # A tokenizer path works like the object.
    by_path = calibration_windows(CALIB_TEXTS * 3, str(tiny_tokenizer_dir), nsamples=5, seqlen=12)
    assert all(torch.equal(a, b) for a, b in zip(windows, by_path, strict=True))


def test_calibration_windows_from_files_and_ids(tmp_path):
    tok = make_local_tokenizer()
    (tmp_path / "a.txt").write_text(" ".join(CALIB_TEXTS[:3]))
    (tmp_path / "b.txt").write_text(" ".join(CALIB_TEXTS[3:]))
    from_dir = calibration_windows(str(tmp_path), tok, nsamples=2, seqlen=8)
    from_file = calibration_windows(tmp_path / "a.txt", tok, nsamples=1, seqlen=8)
    assert len(from_dir) == 2 and from_file[0].shape == (8,)
    ids = [list(range(10)), torch.arange(20).view(1, 20), {"input_ids": torch.arange(5)}]
    samples = calibration_windows(ids, None, nsamples=8, seqlen=16)
    assert [s.numel() for s in samples] == [10, 16, 5]
    lengths = [16, 16, 16, 10, 10]
    batches = make_batches([torch.arange(n) for n in lengths], batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 16), (1, 16), (2, 10)]


def test_default_corpus_and_short_text_warning(caplog):
    tok = make_local_tokenizer()
    windows = calibration_windows(None, tok, nsamples=2, seqlen=64)
    assert len(windows) == 2 and windows[0].shape == (64,)
    with caplog.at_level(logging.WARNING, logger="watersic_hf.integration.data"):
        short = calibration_windows(["the quick brown fox"], tok, nsamples=4, seqlen=64)
    assert short[0].numel() == 4
    assert "fewer than seqlen=64" in caplog.text and "pass more text" in caplog.text


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ([], "dataset is empty"),
        (["", "  "], "calibration texts are empty"),
        ("/no/such/file.txt", "neither an existing path"),
        (["text", 3], "only texts or only token-id sequences"),
        (42, "not supported"),
        ([torch.randn(4)], "must be integers"),
        ([[1, 2, 500]], "vocabulary has 128 entries"),
    ],
)
def test_bad_datasets_raise_clear_errors(dataset, message):
    tok = make_local_tokenizer()
    with pytest.raises((ValueError, TypeError), match=message):
        calibration_windows(dataset, tok, nsamples=2, seqlen=8, vocab_size=VOCAB)


def test_named_dataset_without_extra_names_the_pip_command():
    pytest.importorskip("optimum")
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed; this checks the message when it is not")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"pip install 'watersic-hf\[datasets\]'"):
        calibration_windows("wikitext2", make_local_tokenizer(), nsamples=2, seqlen=8)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_windows(["some text"], str(tmp_path), nsamples=1, seqlen=4)
    with pytest.raises(ValueError, match="WaterSICConfig\\(tokenizer=...\\)"):
        calibration_windows(["some text"], None, nsamples=1, seqlen=4)


# ------------------------------------------------------------------------------------- blocks


def test_capture_block_inputs_matches_embeddings_and_layer_types():
    model = make_tiny_model("llama")
    batches = make_batches(_random_ids(3, 10, seed=6), 2)
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, batches, "cpu")
    for batch, hidden in zip(batches, inputs.hidden, strict=True):
        torch.testing.assert_close(hidden, model.model.embed_tokens(batch))
    kw = inputs.block_kwargs(1, 0)
    assert kw["use_cache"] is False and "position_embeddings" in kw
    # Gemma 3: sliding and full layers get different rotary embeddings; the capture keeps both.
    gemma = make_tiny_model("gemma2")
    gemma3 = make_tiny_model(
        "gemma2", model_type="gemma3_text", sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    for m in (gemma, gemma3):
        _, blocks = find_decoder_blocks(m)
        got = capture_block_inputs(m, blocks, [torch.stack(_random_ids(1, 10, seed=7))], "cpu")
        h = got.hidden[0]
        with torch.no_grad():
            out0 = blocks[0](h, **got.block_kwargs(0, 0))
            out1 = blocks[1](out0, **got.block_kwargs(1, 0))
            ref = m.model(torch.stack(_random_ids(1, 10, seed=7)), output_hidden_states=True)
        torch.testing.assert_close(out0, ref.hidden_states[1])
        # The last hidden state has the final norm applied; compare the block output before it.
        torch.testing.assert_close(m.model.norm(out1), ref.hidden_states[-1])


@pytest.mark.parametrize(
    ("family", "groups", "residual"),
    [
        ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                   ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
         True),
        ("phi3", [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"],
                  ["mlp.down_proj"]], True),
        ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 ["self_attn.out_proj"], ["fc1"], ["fc2"]], True),
        ("gemma2", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
         False),
    ],
)
def test_discover_groups_by_shared_input(family, groups, residual):
    model = make_tiny_model(family)
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, [torch.stack(_random_ids(2, 8, seed=8))], "cpu")
    block = copy.deepcopy(blocks[0])
    probe = install_probe(block)
    structure = discover_groups(
        block, inputs.hidden[0], inputs.block_kwargs(0, 0), quantizable_linears(block, "b", None),
        attention_marker=calib._attention_marker(probe),
    )
    assert [g.names for g in structure.groups] == groups
    assert structure.attention_seen and structure.groups[0].attention_input
    assert not any(g.attention_input for g in structure.groups[1:])
    assert structure.residual_ok is residual
    roles = [g.residual for g in structure.groups]
    assert roles == ([None, "attn", None, "mlp"] if residual else [None] * 4)


def test_should_convert_module_patterns():
    assert not should_convert_module("lm_head", ["lm_head"])
    assert not should_convert_module("model.layers.1.mlp.up_proj", ["model.layers.1"])
    assert should_convert_module("model.layers.11.mlp.up_proj", ["model.layers.1"])
    assert not should_convert_module("model.layers.3.self_attn.q_proj", ["self_attn.q_proj"])
    assert not should_convert_module("model.layers.7.mlp.gate_proj", [r"model\.layers\.\d+\.mlp"])
    assert should_convert_module("model.layers.7.mlp.gate_proj", None)


def test_conv1d_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Conv1D"):
        find_decoder_blocks(gpt2)


# ------------------------------------------------------------------------------------- sequential


def _moments(model, modules, batches):
    """Explicit second moments of the inputs (and outputs) of ``modules`` over ``batches``."""
    seen = {name: [] for name in modules}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in modules]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {name: torch.cat(v).double() for name, v in seen.items()}


def test_sequential_statistics_see_quantized_earlier_layers(monkeypatch):
    """Every layer's Σ_X̂ / Σ_XX̂ / Σ_X equal explicit moments of its inputs in the final quantized
    model (earlier layers and earlier groups of the same block quantized) and in the float model."""
    model = make_tiny_model("llama")
    ref = copy.deepcopy(model)
    data = _random_ids(3, 12, seed=9)
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=data, seqlen=12, attention_weighted=False)
    calls = []
    real = algorithm.watersic_quantize

    def spy(weight, sigma_x, bits, **kw):
        calls.append((sigma_x, kw["sigma_xhat"], kw["sigma_x_xhat"], kw["sigma_residual"]))
        return real(weight, sigma_x, bits, **kw)

    monkeypatch.setattr(algorithm, "watersic_quantize", spy)
    res = calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    names = [r.name for r in res.reports]
    assert names[:7] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    batches = [d[None] for d in data]
    xq = _moments(model, names, batches)
    xf = _moments(ref, names, batches)
    for name, (sx, sxh, sxxh, sres) in zip(names, calls, strict=True):
        n = xq[name].shape[0]
        tol = dict(rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(sx, xf[name].T @ xf[name] / n, **tol)
        torch.testing.assert_close(sxh, xq[name].T @ xq[name] / n, **tol)
        torch.testing.assert_close(sxxh, xf[name].T @ xq[name] / n, **tol)
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert sres is None
        else:
            assert sres is not None and sres.shape == (64, sx.shape[0])
    # Block 1 already sees a quantized block 0, so its statistics drift from the float ones.
    sx, sxh = calls[7][0], calls[7][1]
    assert (sx - sxh).abs().max() > 1e-4 * sx.abs().max()
    # Residual term of block 1's o_proj: E[(r − r̂) x̂ᵀ] with r the block input.
    hf = _moments(ref, ["model.layers.1"], batches)["model.layers.1"]
    hq = _moments(model, ["model.layers.1"], batches)["model.layers.1"]
    o_idx = names.index("model.layers.1.self_attn.o_proj")
    xo = xq["model.layers.1.self_attn.o_proj"]
    torch.testing.assert_close(calls[o_idx][3], (hf - hq).T @ xo / xo.shape[0], rtol=1e-3,
                               atol=1e-7)


def test_attention_weighted_statistics_match_eager_probabilities(monkeypatch):
    model = make_tiny_model("llama")
    eager = make_tiny_model("llama", attn_implementation="eager")
    data = _random_ids(2, 10, seed=10)
    eps = 0.2
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=data, seqlen=10, attn_eps=eps)
    calls = []
    real = algorithm.watersic_quantize

    def spy(weight, sigma_x, bits, **kw):
        calls.append(sigma_x)
        return real(weight, sigma_x, bits, **kw)

    monkeypatch.setattr(algorithm, "watersic_quantize", spy)
    calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    for layer, call_idx in ((0, 0), (1, 7)):
        name = f"model.layers.{layer}.self_attn.q_proj"
        total = 0
        expected = torch.zeros(64, 64, dtype=torch.float64)
        for d in data:
            x = _moments(eager, [name], [d[None]])[name]
            with torch.no_grad():
                probs = eager(d[None], output_attentions=True).attentions[layer]
            p = attention_importance(probs).reshape(-1).double()
            w = (1 - eps) * p + eps
            expected += (x * w[:, None]).T @ x
            total += x.shape[0]
        torch.testing.assert_close(calls[call_idx], expected / total, rtol=1e-4, atol=1e-7)


def test_adaptive_eps_search_runs_and_reports(caplog):
    # steps=0 keeps this cheap: (0,0), (1,0) and (best,1) are evaluated; the golden-section part is
    # covered by test_golden_section_finds_minimum.
    model = make_tiny_model("llama")
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=_random_ids(2, 8, seed=11), seqlen=8,
                                     adaptive_eps=True, adaptive_eps_steps=0)
    with caplog.at_level(logging.INFO, logger="watersic_hf.integration.calibrate"):
        res = calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    assert caplog.text.count("adaptive eps search chose") == 2  # once per block
    assert "3 evaluations" in caplog.text
    assert abs(res.achieved_bits - 3) < 0.02


def test_golden_section_finds_minimum():
    seen = []

    def f(x):
        seen.append(x)
        return (x - 0.3) ** 2

    mid = calib._golden_section(f, 12)
    assert abs(mid - 0.3) < 0.01 and len(seen) == 12 + 3
    assert calib._golden_section(f, 0) == 0.0


def test_relative_output_error_matches_samples():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    xh = x + 0.1 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    q = w + 0.05 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    stats = calib.LayerStats(x.T @ x / 400, xh.T @ xh / 400, x.T @ xh / 400)
    direct = ((x @ w.T - xh @ q.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert calib.relative_output_error(w, q, stats) == pytest.approx(float(direct), rel=1e-5)
    plain = calib.LayerStats(x.T @ x / 400)
    direct = ((x @ (w - q).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert calib.relative_output_error(w, q, plain) == pytest.approx(float(direct), rel=1e-5)


# ------------------------------------------------------------------------------------- bad input


def test_nothing_to_quantize_and_nan_activations():
    model = make_tiny_model("llama")
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=_random_ids(1, 8, seed=13), seqlen=8)
    with pytest.raises(ValueError, match="no nn.Linear left to quantize"):
        calib.calibrate_model(model, cfg, modules_to_not_convert=["model.layers"])
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.fill_(math.inf)
    with pytest.raises(ValueError, match="NaN/inf in the calibration activations"):
        calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    assert move_to({"a": (torch.ones(1), [torch.zeros(1)])}, "cpu")["a"][1][0].device.type == "cpu"
