"""Decisions taken before calibration: refusals, device-aware calibration size, time estimate,
the small-calibration-set warning (watersic_hf.integration.plan), shared by the Python API and
the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _tiny import make_tiny_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

import watersic_hf.integration.calibrate as calibrate_module
from watersic_hf import WaterSICConfig
from watersic_hf.cli import quantize_main
from watersic_hf.integration import plan

PLAN_LOGGER = "watersic_hf.integration.plan"


def _ids(n: int, length: int = 16) -> list[torch.Tensor]:
    return [torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(i))
            for i in range(n)]


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration starts: refusals must come before any work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration started although the model must be refused first")

    monkeypatch.setattr(calibrate_module, "calibrate_model", forbidden)


# --------------------------------------------------------------------------------- refusals


def test_encoder_decoder_is_refused_before_any_work(tmp_path, no_calibration):
    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, quantization_config=WaterSICConfig())
    message = str(err.value)
    assert "does not support encoder-decoder models such as T5ForConditionalGeneration" in message
    assert "decoder-only causal language models" in message and "Llama" in message


def test_conv1d_model_is_refused_before_any_work(tmp_path, no_calibration):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="cannot quantize GPT2LMHeadModel .*Conv1D.*Supported: "
                                         "decoder-only"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=WaterSICConfig())


# ------------------------------------------------------------------ defaults and the estimate


def test_defaults_follow_the_calibration_device():
    assert plan.default_calibration_size("cpu") == (32, 512)
    assert plan.default_calibration_size("cuda:1") == (128, 2048)
    model = make_tiny_model("llama")
    cfg = WaterSICConfig(device="cuda")  # planning only: nothing touches the device
    result = plan.plan_calibration(model, cfg)
    assert (cfg.nsamples, cfg.seqlen, result.minutes) == (128, 2048, None)
    cfg = WaterSICConfig(device="cpu", seqlen=64)  # an explicit value is kept
    result = plan.plan_calibration(model, cfg)
    assert (cfg.nsamples, cfg.seqlen, result.tokens) == (32, 64, 32 * 64)
    assert result.minutes is not None and result.minutes > 0
    # below 2.5 bits the adaptive-eps search runs by default and the estimate grows with it
    low = plan.plan_calibration(model, WaterSICConfig(device="cpu", seqlen=64, bits=2))
    assert low.minutes == pytest.approx(result.minutes * plan.ADAPTIVE_EPS_TIME_FACTOR)
    fixed = WaterSICConfig(device="cpu", seqlen=64, bits=2, adaptive_eps=False)
    assert plan.plan_calibration(model, fixed).minutes == pytest.approx(result.minutes)


def test_cpu_estimate_reproduces_the_measured_block_times():
    # The model behind the estimate: one SmolLM2-135M block took 19.7 s at 4k tokens and 47.5 s
    # at 16k on the 2-core CI host (30 blocks).
    for tokens, seconds in ((4096, 19.7), (16384, 47.5)):
        minutes = plan.expected_minutes(int(plan.SMOLLM2_PARAMS), 1, tokens, "cpu")
        assert minutes * 60 / plan.SMOLLM2_BLOCKS == pytest.approx(seconds, rel=0.03)
    assert plan.expected_minutes(10**9, 128, 2048, "cuda") is None


def test_small_calibration_set_warning(caplog):
    model = make_tiny_model("llama")  # widest quantized input: mlp.down_proj, 128 features
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER):
        result = plan.plan_calibration(model, WaterSICConfig(device="cpu", nsamples=2, seqlen=16))
    assert (result.widest_layer, result.widest_inputs) == ("model.layers.0.mlp.down_proj", 128)
    assert "32 tokens, fewer than 10 x the 128 inputs" in caplog.text
    assert "model.layers.0.mlp.down_proj" in caplog.text and "damp" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER):
        # Token-id samples are counted as they are (3 x 500 >= 1280), and skipped layers do not
        # count: without the MLP the widest input is 64.
        plan.plan_calibration(model, WaterSICConfig(device="cpu", dataset=_ids(3, 500)))
        plan.plan_calibration(model, WaterSICConfig(device="cpu", nsamples=40, seqlen=16),
                              skip=["mlp.down_proj"])
        plan.plan_calibration(model, WaterSICConfig(device="cpu", nsamples=1, seqlen=16,
                                                    method="rtn"))  # uses no data
    assert "fewer than" not in caplog.text


def test_python_api_logs_the_plan_before_calibrating(tmp_path, caplog):
    make_tiny_model("llama", tmp_path)
    cfg = WaterSICConfig(bits=4, dataset=_ids(4), method="gptq", device="cpu")
    with caplog.at_level(logging.INFO, logger="watersic_hf"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    qc = model.config.quantization_config
    assert (qc.nsamples, qc.seqlen, qc.calibration_tokens) == (32, 512, 64)  # CPU defaults
    messages = [r.getMessage() for r in caplog.records]
    estimate = next(i for i, m in enumerate(messages) if "on the CPU with 32 x 512 tokens" in m)
    started = next(i for i, m in enumerate(messages) if "calibration on 64 tokens" in m)
    assert estimate < started
    assert "expect roughly" in messages[estimate]
    assert any("fewer than 10 x the 128 inputs" in m for m in messages)


def test_cli_uses_the_same_defaults(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(plan.CALIBRATION_DEFAULTS, "cpu", (3, 24))
    out = tmp_path / "q"
    assert quantize_main([str(tiny_llama_dir), "--out", str(out), "--bits", "4", "--method",
                          "rtn", "--device", "cpu"]) == 0
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (stored["nsamples"], stored["seqlen"]) == (3, 24)
