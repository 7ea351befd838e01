"""The transformers integration end to end on tiny random models (HF's quantizer-test template).

Quantize on load, module counts, save / reload (in a fresh process, sharded, bf16, device_map),
generate and pipeline, dequantize, and the error paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import make_local_tokenizer, make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, pipeline

from watersic_hf import WaterSICConfig, WaterSICHfQuantizer, WaterSICLinear

VOCAB = 128
TESTS = os.path.dirname(os.path.abspath(__file__))


def _ids(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


EVAL_IDS = torch.stack(_ids(2, 16, seed=123))


def _count(model, quantized_types: tuple[type, ...] = (WaterSICLinear,)) -> tuple[int, int]:
    n_q = sum(isinstance(m, quantized_types) for m in model.modules())
    n_lin = sum(type(m) is torch.nn.Linear for m in model.modules())
    return n_q, n_lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": TESTS, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300, cwd=TESTS)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny Llama quantized on load at 4 bits, its float twin, and its saved folder."""
    src = tmp_path_factory.mktemp("llama_src")
    ref = make_tiny_model("llama", src)
    make_local_tokenizer(src)
    cfg = WaterSICConfig(bits=4, dataset=_ids(8, 16, seed=1), seqlen=16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("llama_q")
    model.save_pretrained(out)
    make_local_tokenizer(out)
    with torch.no_grad():
        logits = model(EVAL_IDS).logits
    return {"src": src, "ref": ref, "model": model, "dir": out, "logits": logits}


# ------------------------------------------------------------------------------------- on load


def test_quantize_on_load_llama(quantized):
    model, ref = quantized["model"], quantized["ref"]
    assert _count(model) == (14, 1)  # every block Linear; lm_head kept
    assert type(model.lm_head) is torch.nn.Linear
    assert model.is_quantized and model.quantization_method == "watersic"
    qc = model.config.quantization_config
    assert isinstance(qc, WaterSICConfig) and len(qc.layers) == 14
    assert abs(qc.achieved_bits - 4) < 0.02 and qc.calibration_tokens == 128
    assert qc.modules_to_not_convert == ["lm_head"]
    assert all(not p.requires_grad for p in model.parameters() if not p.is_floating_point())
    with torch.no_grad():
        err = _rel(quantized["logits"], ref(EVAL_IDS).logits)
    assert err < 0.2, err


@pytest.mark.parametrize(
    ("family", "tie", "skip", "expected"),
    [
        ("qwen3", True, None, (14, 0)),  # tied lm_head stays a tied Linear-free head
        ("mistral", False, ["mlp.down_proj"], (12, 3)),
        ("phi3", False, None, (8, 1)),  # fused qkv_proj / gate_up_proj
    ],
)
def test_quantize_on_load_other_families(tmp_path, family, tie, skip, expected):
    ref = make_tiny_model(family, tmp_path, tie=tie)
    cfg = WaterSICConfig(bits=4, dataset=_ids(8, 16, seed=2), seqlen=16,
                         modules_to_not_convert=skip)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    n_q, n_lin = _count(model)
    assert n_q == expected[0]
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.config.quantization_config.achieved_bits - 4) < 0.02
    with torch.no_grad():
        err = _rel(model(EVAL_IDS).logits, ref(EVAL_IDS).logits)
    assert err < 0.6, err  # sanity bound: a broken pipeline gives ~1
    if skip:
        assert all(type(b.mlp.down_proj) is torch.nn.Linear for b in model.model.layers)
        assert "mlp.down_proj" in model.config.quantization_config.modules_to_not_convert
    # Save and reload in this process: same logits.
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert _count(again) == (n_q, n_lin)
    with torch.no_grad():
        torch.testing.assert_close(again(EVAL_IDS).logits, model(EVAL_IDS).logits, rtol=0, atol=0)


def test_conversion_count_on_meta_skeleton(quantized):
    from accelerate import init_empty_weights

    from watersic_hf.storage.checkpoint import WaterSICCheckpointLinear

    # Format 2: every stored layer is a WaterSICCheckpointLinear placeholder until the after-hook
    # checks its manifest and builds the WaterSICLinear.
    skeleton_types = (WaterSICLinear, WaterSICCheckpointLinear)
    files = [str(quantized["dir"] / "model.safetensors")]

    from watersic_hf.storage.checkpoint import build_checkpoint_skeleton

    layers = quantized["model"].config.quantization_config.layers
    for keep in (None, ["mlp"]):
        cfg = WaterSICConfig.from_dict(quantized["model"].config.quantization_config.to_dict())
        if keep:
            cfg.layers = {k: v for k, v in layers.items() if not any(s in k for s in keep)}
        hf_quantizer = WaterSICHfQuantizer(cfg, pre_quantized=True)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(tiny_config("llama"))
        if keep:
            # the files store layers this config does not list: refused before any surgery
            with pytest.raises(ValueError, match="does not list"):
                hf_quantizer.preprocess_model(skeleton, checkpoint_files=files)
            build_checkpoint_skeleton(skeleton, cfg.layers, version=2)
        else:
            hf_quantizer.preprocess_model(skeleton, checkpoint_files=files)
        n_q, n_lin = _count(skeleton, skeleton_types)
        assert n_q == len(cfg.layers) and n_q + n_lin == 15
        assert all(p.device.type == "meta" for p in skeleton.parameters())
    # Quantize mode on meta: only the skip list is computed (defaults + the user's).
    hf_quantizer = WaterSICHfQuantizer(WaterSICConfig(modules_to_not_convert=["mlp.up_proj"]),
                                       pre_quantized=False)
    with init_empty_weights():
        tied = AutoModelForCausalLM.from_config(tiny_config("llama", tie=True))
    hf_quantizer.preprocess_model(tied)
    assert _count(tied) == (0, 15)
    assert hf_quantizer.modules_to_not_convert == ["lm_head", "mlp.up_proj", "model.embed_tokens"]


# ------------------------------------------------------------------------------------- reload


def test_saved_config_and_tensors(quantized):
    stored = json.loads((quantized["dir"] / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "watersic" and stored["format_version"] >= 1
    assert stored["dataset"] is None and stored["tokenizer"] is None
    name = "model.layers.0.self_attn.q_proj"
    entry = stored["layers"][name]
    assert (entry["in"], entry["out"], entry["bias"]) == (64, 64, False)
    assert entry["layout"] == quantized["model"].get_submodule(name).layout_metadata()
    assert {"bits", "target_bits", "dead_columns", "rel_err"} <= set(entry)
    from safetensors import safe_open

    with safe_open(quantized["dir"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"{name}.weight_col_scale").dtype == torch.float16
        manifest = f.get_tensor(f"{name}.weight")
    # `<layer>.weight` is the layer's manifest: 1-D uint8, so it can never load into nn.Linear
    assert manifest.dtype == torch.uint8 and manifest.dim() == 1
    assert json.loads(bytes(manifest.tolist()))["layout"] == entry["layout"]
    assert f"{name}.weight_col_scale" in keys
    assert "lm_head.weight" in keys


def test_reload_in_fresh_process_gives_identical_logits(quantized, tmp_path):
    # One fresh process with the automatic registration switched off (tests/test_autoregister.py
    # covers it on): first without the plugin registered (plain transformers must refuse the
    # files, never build random Linear weights), then with `import watersic_hf` (exact logits).
    out = tmp_path / "logits.pt"
    torch.save(EVAL_IDS, tmp_path / "ids.pt")
    result = _run_python(f"""
        import torch, transformers
        from transformers import AutoModelForCausalLM
        transformers.logging.set_verbosity_error()  # silence must not hide the failure
        path = {str(quantized["dir"])!r}
        try:
            AutoModelForCausalLM.from_pretrained(path)
            print("without: loaded")
        except Exception as err:
            print("without: refused", type(err).__name__, "ignore_mismatched_sizes" in str(err))
        import watersic_hf
        m = AutoModelForCausalLM.from_pretrained(path)
        print("with:", type(m.model.layers[0].mlp.down_proj).__name__)
        with torch.no_grad():
            torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(out)!r})
    """, WATERSIC_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without: refused RuntimeError True" in result.stdout, result.stdout
    assert "with: WaterSICLinear" in result.stdout
    torch.testing.assert_close(torch.load(out), quantized["logits"], rtol=0, atol=0)


def test_sharded_bf16_and_auto_device_map_reloads(quantized, tmp_path):
    model = quantized["model"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(sharded(EVAL_IDS).logits, quantized["logits"], rtol=0, atol=0)
    half = AutoModelForCausalLM.from_pretrained(quantized["dir"], dtype=torch.bfloat16,
                                                device_map="auto")
    q = half.model.layers[0].self_attn.q_proj
    assert isinstance(q, WaterSICLinear) and q.weight_col_scale.dtype == torch.float16
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert _rel(half(EVAL_IDS).logits.float(), quantized["logits"]) < 0.05


def test_generate_pipeline_and_dequantize(quantized):
    gen = pipeline("text-generation", model=str(quantized["dir"]), device="cpu")
    assert isinstance(gen.model.model.layers[0].mlp.up_proj, WaterSICLinear)
    text = gen("the quick brown", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick brown")
    model = AutoModelForCausalLM.from_pretrained(quantized["dir"])
    out = model.generate(EVAL_IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    model.dequantize()
    assert _count(model) == (0, 15)
    with torch.no_grad():
        torch.testing.assert_close(model(EVAL_IDS).logits, quantized["logits"], rtol=1e-4,
                                   atol=1e-4)


# ------------------------------------------------------------------------------------- errors


def test_error_paths_leave_files_untouched(quantized, tmp_path):
    src = quantized["src"]
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    with pytest.raises(ValueError, match="no nn.Linear left to quantize"):
        AutoModelForCausalLM.from_pretrained(
            src, quantization_config=WaterSICConfig(dataset=_ids(1, 8, 0), seqlen=8,
                                                    modules_to_not_convert=["model.layers"]))
    with pytest.raises(ValueError, match="WaterSICConfig\\(tokenizer=...\\)|tokenizer"):
        # Text data but no tokenizer anywhere (the model folder has none).
        bare = tmp_path / "bare"
        make_tiny_model("llama", bare)
        AutoModelForCausalLM.from_pretrained(
            bare, quantization_config=WaterSICConfig(dataset=["some text"], seqlen=8))
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    # A checkpoint written by a newer format is refused with the upgrade command.
    newer = tmp_path / "newer"
    quantized["model"].save_pretrained(newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_default_dataset_and_model_tokenizer(tmp_path):
    # WaterSICConfig(bits=...) alone: the shipped corpus and the tokenizer found next to the model.
    make_tiny_model("llama", tmp_path)
    make_local_tokenizer(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=WaterSICConfig(bits=3, nsamples=2, seqlen=16,
                                                     method="gptq"))
    assert model.config.quantization_config.calibration_tokens == 32
    assert _count(model)[0] == 14
