"""WaterSICConfig: defaults, validation, JSON round trips, registration."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from _tiny import make_local_tokenizer
from transformers import AutoConfig
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)

import watersic_hf
from watersic_hf import FORMAT_VERSION, WaterSICConfig, WaterSICHfQuantizer
from watersic_hf.quantizer import register


def test_adaptive_eps_default_depends_on_the_rate():
    # None: the search runs for WaterSIC below 2.5 bits (where it was measured to pay off)
    assert WaterSICConfig(bits=2).adaptive_eps_on and WaterSICConfig(bits=2.4).adaptive_eps_on
    assert not WaterSICConfig(bits=2.5).adaptive_eps_on and not WaterSICConfig().adaptive_eps_on
    # an explicit choice wins; other methods never run it
    assert WaterSICConfig(bits=4, adaptive_eps=True).adaptive_eps_on
    assert not WaterSICConfig(bits=2, adaptive_eps=False).adaptive_eps_on
    assert not WaterSICConfig(bits=2, method="gptq").adaptive_eps_on
    assert not WaterSICConfig(bits=2, method="rtn", adaptive_eps=True).adaptive_eps_on
    with pytest.raises(TypeError, match="adaptive_eps"):
        WaterSICConfig(adaptive_eps="yes")
    back = WaterSICConfig.from_dict(WaterSICConfig(bits=2).to_dict())
    assert back.adaptive_eps is None and back.adaptive_eps_on


def test_defaults_and_effective_damp():
    cfg = WaterSICConfig()
    assert cfg.quant_method == "watersic"
    # nsamples / seqlen: None = chosen by the calibration device (tests/test_plan.py)
    assert (cfg.bits, cfg.nsamples, cfg.seqlen, cfg.method) == (3.0, None, None, "watersic")
    assert cfg.drift and cfg.residual_compensation and cfg.attention_weighted and cfg.rate_control
    assert cfg.adaptive_eps is None and cfg.attn_eps == 0.01 and cfg.storage == "entropy"
    assert cfg.format_version == FORMAT_VERSION and cfg.layers == {}
    # damp=None: automatic damping; 0.01 is only its fallback (a single calibration batch)
    assert cfg.damp is None and cfg.auto_damp and cfg.holdout_fraction == 0.25
    assert cfg.effective_damp == 0.01
    assert WaterSICConfig(damp=1e-4).effective_damp == 1e-4
    assert WaterSICConfig(method="gptq").effective_damp == 0.01
    assert WaterSICConfig(method="gptq", damp=0.1).effective_damp == 0.1


def test_round_trip_is_plain_json_with_runtime_objects_attached():
    tok = make_local_tokenizer()
    cfg = WaterSICConfig(bits=2.5, dataset=["a text", "another"], tokenizer=tok, nsamples=4,
                         seqlen=16, modules_to_not_convert=["mlp.down_proj"], method="gptq_entropy",
                         attn_eps=0.1, storage="packed", backend="torch")
    d = cfg.to_dict()
    text = json.dumps(d)  # must not raise: no tokenizer / dataset objects
    assert d["dataset"] is None and d["tokenizer"] is None
    assert d["quant_method"] == "watersic" and d["bits"] == 2.5
    again = WaterSICConfig.from_dict(json.loads(text))
    assert again.to_dict() == d
    # String datasets / tokenizer paths are kept (provenance).
    named = WaterSICConfig(dataset="/data/calib.txt", tokenizer="/models/tok").to_dict()
    assert named["dataset"] == "/data/calib.txt" and named["tokenizer"] == "/models/tok"
    # repr and the transformers-side dispatch work too.
    assert "watersic" in repr(cfg)
    assert isinstance(AutoQuantizationConfig.from_dict(d), WaterSICConfig)
    assert dict(cfg)["bits"] == 2.5


def test_result_fields_survive_a_model_config_round_trip(tmp_path):
    cfg = WaterSICConfig(bits=3)
    cfg.layers = {"model.layers.0.mlp.up_proj": {"in": 4, "out": 8, "bias": False,
                                                 "layout": {"format": "plain", "version": 1}}}
    cfg.achieved_bits = 3.001
    cfg.calibration_tokens = 64
    model_cfg = AutoConfig.for_model("llama", hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=8, vocab_size=16)
    model_cfg.quantization_config = cfg
    model_cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["layers"] == cfg.layers and stored["achieved_bits"] == 3.001
    assert WaterSICConfig.from_dict(stored).layers == cfg.layers


def test_unknown_keys_warn_and_are_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="watersic_hf.config"):
        cfg = WaterSICConfig.from_dict({"quant_method": "watersic", "bits": 3, "new_field": 7})
    assert "new_field" in caplog.text and "pip install -U watersic-hf" in caplog.text
    assert cfg.to_dict()["new_field"] == 7
    # transformers' own dispatch (what from_pretrained uses on a saved config.json) takes the
    # same forgiving path, and the unknown key survives a round trip.
    again = AutoQuantizationConfig.from_dict({**cfg.to_dict(), "bits": 2.5})
    assert again.bits == 2.5 and again.to_dict()["new_field"] == 7
    cfg2, unused = WaterSICConfig.from_dict({"bits": 3}, return_unused_kwargs=True, seed=4, x=1)
    assert cfg2.seed == 4 and unused == {"x": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bit": 2}, r"unexpected keyword argument 'bit' \(did you mean 'bits'\?\)$"),
        ({"nsample": 8}, r"'nsample' \(did you mean 'nsamples'\?\)"),
        ({"seq_len": 8}, r"'seq_len' \(did you mean 'seqlen'\?\)"),
        ({"frobnicate": 1},
         r"argument 'frobnicate'; the options are: bits, dataset, .*backend, resume, "
         r"work_dir(, \w+)*$"),
    ],
)
def test_unknown_keyword_arguments_raise_with_a_suggestion(kwargs, message):
    # A typo used to be accepted with a warning blaming "a newer watersic_hf" and quantized at the
    # default 3 bits.
    with pytest.raises(TypeError, match=message):
        WaterSICConfig(**kwargs)


def test_newer_format_version_is_refused():
    with pytest.raises(ValueError, match="format_version 99.*pip install -U watersic-hf"):
        WaterSICConfig.from_dict({"quant_method": "watersic", "format_version": 99})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 0.1}, ValueError, r"bits must lie in \[0.25, 16"),
        ({"bits": 17}, ValueError, "bits must lie in"),
        ({"bits": float("nan")}, ValueError, "bits must lie in"),
        ({"bits": "3"}, TypeError, "bits must be a number"),
        ({"method": "awq"}, ValueError, "method must be one of"),
        ({"storage": "zip"}, ValueError, "storage must be one of"),
        ({"nsamples": 0}, ValueError, "nsamples must be >= 1"),
        ({"seqlen": 1.5}, TypeError, "seqlen must be an int"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"attn_eps": 1.5}, ValueError, "attn_eps must lie in"),
        ({"drift": "yes"}, TypeError, "drift must be True or False"),
        ({"modules_to_not_convert": "lm_head"}, TypeError, "list of module names"),
        ({"tokenizer": 3}, TypeError, "tokenizer object or a path"),
        ({"quant_method": "gptq"}, ValueError, "only describes 'watersic'"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        WaterSICConfig(**kwargs)


def test_deepcopy_shares_dataset_and_tokenizer():
    data = [f"text {i}" for i in range(1000)]
    tok = make_local_tokenizer()
    cfg = WaterSICConfig(dataset=data, tokenizer=tok, modules_to_not_convert=["x"])
    cfg.layers = {"a": {"in": 1}}
    twin = copy.deepcopy(copy.deepcopy(cfg))  # from_pretrained copies twice
    assert twin.dataset is data and twin.tokenizer is tok
    assert twin.layers == cfg.layers and twin.layers is not cfg.layers
    assert twin.modules_to_not_convert is not cfg.modules_to_not_convert


def test_registration_is_idempotent():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["watersic"] is WaterSICConfig
    assert AUTO_QUANTIZER_MAPPING["watersic"] is WaterSICHfQuantizer
    register()
    register()
    import importlib

    importlib.reload(watersic_hf)
    assert AUTO_QUANTIZER_MAPPING["watersic"] is WaterSICHfQuantizer
    assert WaterSICHfQuantizer.requires_calibration is False
