"""Reliability suite (issue 6): bad inputs give clear errors, failures leave nothing half written,
the same seed gives the same bytes, broken checkpoints are refused by name, and a long generate
loop on a quantized model does not grow memory.

Everything runs on a 1-block Llama with hidden size 32 (a quantization takes well under a second).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tracemalloc
import types
import warnings

import pytest
import torch
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import watersic_hf
import watersic_hf.algorithm
import watersic_hf.storage.checkpoint
from watersic_hf import WaterSICConfig, WaterSICLinear
from watersic_hf.cli import quantize_main

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1,
)
# More windows than nsamples, so that the seed really chooses which windows calibrate.
TEXTS = CALIB_TEXTS * 4
QUICK = dict(bits=3, dataset=TEXTS, nsamples=4, seqlen=16)
logger = logging.getLogger(__name__)


def _hash_tree(root) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _quantize(path, **overrides):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=WaterSICConfig(**{**QUICK, **overrides})
    )


def _fail_on_call(monkeypatch, n: int) -> list[int]:
    """Make ``watersic_hf.algorithm.watersic_quantize`` raise on its ``n``-th call (mid-model)."""
    real = watersic_hf.algorithm.watersic_quantize
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected failure mid-quantization")
        return real(*args, **kwargs)

    monkeypatch.setattr(watersic_hf.algorithm, "watersic_quantize", flaky)
    return calls


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 1-block, hidden-32 random Llama with its word-level tokenizer, saved to disk."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("rel_tiny")
    make_tiny_model("llama", path, **SMALL)
    make_local_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def seeded(tiny_dir, tmp_path_factory):
    """Two independent seed-0 quantizations (plus a second save of the first) and a seed-1 one,
    each saved into a folder named ``ckpt`` under its own parent."""
    root = tmp_path_factory.mktemp("seeded")
    dirs = {}
    first = _quantize(tiny_dir, seed=0)
    for key in ("a", "a_again"):
        dirs[key] = root / key / "ckpt"
        first.save_pretrained(dirs[key])
    dirs["b"] = root / "b" / "ckpt"
    _quantize(tiny_dir, seed=0).save_pretrained(dirs["b"])
    dirs["seed1"] = root / "seed1" / "ckpt"
    _quantize(tiny_dir, seed=1).save_pretrained(dirs["seed1"])
    return dirs


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, exc, fragments",
    [
        ({"bits": 0}, ValueError, ("bits", "0")),
        ({"bits": 100}, ValueError, ("bits", "100")),
        ({"bits": "x"}, TypeError, ("bits", "'x'")),
        ({"nsamples": 0}, ValueError, ("nsamples", "0")),
        ({"seqlen": -1}, ValueError, ("seqlen", "-1")),
        ({"method": "awq"}, ValueError, ("method", "'awq'")),
        ({"storage": "zip"}, ValueError, ("storage", "'zip'")),
    ],
    ids=["bits0", "bits100", "bits_str", "nsamples0", "seqlen-1", "method", "storage"],
)
def test_config_rejects_bad_values(kwargs, exc, fragments):
    with pytest.raises(exc) as err:
        WaterSICConfig(**kwargs)
    assert type(err.value) is exc
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("empty_dataset", ("dataset", "empty")),
        ("missing_dataset_path", ("dataset", "no_such_calib.txt")),
        ("missing_tokenizer_path", ("tokenizer", "no_such_tokenizer")),
        ("skip_everything_regex", ("modules_to_not_convert", "'.*'")),
        ("skip_layers_prefix", ("modules_to_not_convert", "model.layers")),
    ],
)
def test_quantize_time_bad_inputs_leave_source_untouched(tiny_dir, tmp_path, case, fragments):
    before = _hash_tree(tiny_dir)
    kwargs: dict = {}
    load_kwargs: dict = {}
    if case == "empty_dataset":
        kwargs["dataset"] = []
    elif case == "missing_dataset_path":
        kwargs["dataset"] = str(tmp_path / "no_such_calib.txt")
    elif case == "missing_tokenizer_path":
        kwargs["tokenizer"] = str(tmp_path / "no_such_tokenizer")
    elif case == "skip_everything_regex":
        kwargs["modules_to_not_convert"] = [r".*"]
    else:
        kwargs["modules_to_not_convert"] = ["model.layers"]
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(
            tiny_dir, quantization_config=WaterSICConfig(**{**QUICK, **kwargs}), **load_kwargs
        )
    for fragment in fragments:
        assert fragment in str(err.value)
    assert _hash_tree(tiny_dir) == before


@pytest.mark.parametrize("method", ["watersic", "gptq"])
def test_nan_activations_give_a_clear_error(tmp_path, method):
    # RTN is data-free (no calibration forward), so only the calibrated methods can see this.
    model = make_tiny_model("llama", **SMALL)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    model.save_pretrained(tmp_path)
    make_local_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="NaN") as err:
        _quantize(tmp_path, method=method)
    assert "q_proj" in str(err.value) and "dtype" in str(err.value)


def _sigma(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g)
    return x.T @ x / x.shape[0]


def _bad_algorithm_input(case: str):
    g = torch.Generator().manual_seed(1)
    weight, sigma, bits = torch.randn(8, 16, generator=g), _sigma(16), 3.0
    if case == "nan_weight":
        weight[2, 3] = float("nan")
    elif case == "asymmetric_sigma":
        sigma[0, 5] += 1.0
    elif case == "shape_mismatch":
        sigma = _sigma(12)
    elif case == "zero_sigma":
        sigma = torch.zeros(16, 16)
    elif case == "bits_zero":
        bits = 0.0
    elif case == "bits_nan":
        bits = float("nan")
    elif case == "bits_high":
        bits = 40.0
    return weight, sigma, bits


@pytest.mark.parametrize(
    "case, exc, fragments",
    [
        ("nan_weight", ValueError, ("weight", "NaN")),
        ("asymmetric_sigma", ValueError, ("sigma_x", "symmetric")),
        ("shape_mismatch", ValueError, ("sigma_x", "(12, 12)", "(16, 16)")),
        ("zero_sigma", ValueError, ("sigma_x", "all zeros")),
        ("bits_zero", ValueError, ("bits=0.0", "range")),
        ("bits_nan", ValueError, ("bits=nan", "range")),
        ("bits_high", ValueError, ("bits", "40")),
    ],
)
@pytest.mark.parametrize("method", ["watersic", "gptq_entropy"])
def test_algorithm_rejects_bad_input(method, case, exc, fragments):
    quantize = getattr(watersic_hf.algorithm, f"{method}_quantize")
    weight, sigma, bits = _bad_algorithm_input(case)
    with pytest.raises(exc) as err:
        quantize(weight, sigma, bits)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_from_quantized_rejects_scales_fp16_cannot_hold():
    g = torch.Generator().manual_seed(2)
    qw = types.SimpleNamespace(
        codes=torch.randint(-3, 4, (8, 16), generator=g, dtype=torch.int32),
        col_scale=torch.full((16,), 0.1),  # 0.1 is not a float16 value
        row_scale=torch.ones(8),
        dead_columns=torch.zeros(0, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="fp16") as err:
        WaterSICLinear.from_quantized(qw, None)
    assert "col_scale" in str(err.value)
    qw.col_scale = qw.col_scale.half().float()
    assert isinstance(WaterSICLinear.from_quantized(qw, None, backend="torch"), WaterSICLinear)


# ------------------------------------------------------------------ interrupted quantization


def _cli_argv(src, out, calib):
    return [str(src), "--out", str(out), "--dataset", str(calib), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu"]


def test_cli_interrupted_mid_calibration_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(TEXTS), encoding="utf-8")
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "model-3bit"
    before = _hash_tree(tiny_dir)
    calls = _fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_main(_cli_argv(tiny_dir, out, calib))
    assert calls[0] == 3  # it really failed in the middle of the first block
    assert not out.exists()
    assert list(parent.iterdir()) == []  # no temp folder left next to --out
    assert _hash_tree(tiny_dir) == before


def test_cli_interrupted_while_saving_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(TEXTS), encoding="utf-8")
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "model-3bit"

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure while saving")

    monkeypatch.setattr(watersic_hf.storage.checkpoint, "encode_model_state", boom)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_main(_cli_argv(tiny_dir, out, calib))
    assert not out.exists()
    assert list(parent.iterdir()) == []


def test_from_pretrained_interrupted_leaves_model_folder_identical(tiny_dir, monkeypatch):
    before = _hash_tree(tiny_dir)
    names_before = sorted(os.listdir(tiny_dir.parent))
    calls = _fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected"):
        _quantize(tiny_dir)
    assert calls[0] == 3
    assert _hash_tree(tiny_dir) == before
    assert sorted(os.listdir(tiny_dir.parent)) == names_before


# ---------------------------------------------------------------------------- determinism


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _file_bytes(ckpt, name: str) -> bytes:
    data = (ckpt / name).read_bytes()
    if name == "README.md":
        # The model card names the folder it was saved to; only that path legitimately differs.
        data = data.replace(str(ckpt).encode(), b"<ckpt>")
    return data


def test_same_seed_gives_same_tensors_and_config(seeded):
    a, b = seeded["a"], seeded["b"]
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    with safe_open(os.path.join(a, "model.safetensors"), "pt") as fa, safe_open(
        os.path.join(b, "model.safetensors"), "pt"
    ) as fb:
        assert fa.metadata() == fb.metadata()


def _header_start(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(100)[8:]


def test_same_seed_gives_byte_identical_checkpoints(seeded):
    """Every file, byte for byte (README.md after replacing the folder path it names).

    Three saves are compared so that an unordered header (e.g. safetensors metadata keys in hash
    order) is caught with high probability rather than by luck.
    """
    ref = seeded["a"]
    names = sorted(p.name for p in ref.iterdir())
    assert {"config.json", "model.safetensors"} <= set(names)
    for other in (seeded["a_again"], seeded["b"]):
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            same = _file_bytes(ref, name) == _file_bytes(other, name)
            if not same and name.endswith(".safetensors"):
                # Say whether only the header's byte order differs (same tensors and metadata).
                with safe_open(ref / name, "pt") as fa, safe_open(other / name, "pt") as fb:
                    meta_same = fa.metadata() == fb.metadata()
                    ta, tb = _tensors(ref), _tensors(other)
                    tensors_same = ta.keys() == tb.keys() and all(
                        torch.equal(ta[k], tb[k]) for k in ta
                    )
                pytest.fail(
                    f"{name} of {other.parent.name}/ckpt differs from a/ckpt byte for byte; "
                    f"metadata equal={meta_same}, tensors equal={tensors_same} (header order: "
                    f"{_header_start(ref / name)!r} vs {_header_start(other / name)!r})"
                )
            assert same, f"{name} differs"


def test_different_seed_changes_codes_and_still_loads(seeded):
    ta, t1 = _tensors(seeded["a"]), _tensors(seeded["seed1"])
    quantized = [k for k in ta if ta[k].dtype == torch.uint8 or not ta[k].is_floating_point()]
    assert quantized
    assert any(ta[k].shape != t1[k].shape or not torch.equal(ta[k], t1[k]) for k in quantized)
    model = AutoModelForCausalLM.from_pretrained(seeded["seed1"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[4, 5, 6, 7]])).logits).all()


# ---------------------------------------------------------------------------- loading errors


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_shard_is_named(seeded, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(seeded["a"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(OSError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert shards[-1].name in str(err.value)


def test_wrong_quant_method_is_refused(seeded, tmp_path):
    # transformers dispatches on quant_method: a WaterSIC checkpoint relabelled "gptq" must not
    # load silently (it would give random or garbage weights). The error text comes from
    # transformers' GPTQ path, not from watersic_hf.
    bad = _edit_config(seeded["a"], tmp_path / "gptq", quant_method="gptq")
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; silence is the bug
        AutoModelForCausalLM.from_pretrained(bad)
    # A WaterSICConfig passed for a checkpoint of another method: refused naming both configs.
    with pytest.raises(ValueError, match="WaterSICConfig") as err:
        AutoModelForCausalLM.from_pretrained(bad, quantization_config=WaterSICConfig(bits=3))
    assert "GPTQConfig" in str(err.value)


def test_watersic_config_for_a_watersic_checkpoint_loads_the_saved_codes(seeded):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(
            seeded["a"], quantization_config=WaterSICConfig(bits=2)
        )
    assert any("quantization_config" in str(w.message) for w in caught)
    saved = json.loads((seeded["a"] / "config.json").read_text())["quantization_config"]
    assert model.config.quantization_config.achieved_bits == saved["achieved_bits"]
    assert sum(isinstance(m, WaterSICLinear) for m in model.modules()) == len(saved["layers"])


def test_newer_format_version_asks_for_an_upgrade(seeded, tmp_path):
    newer = _edit_config(seeded["a"], tmp_path / "newer", format_version=999)
    with pytest.raises(ValueError, match="format_version 999") as err:
        AutoModelForCausalLM.from_pretrained(newer)
    assert "upgrade" in str(err.value) and "pip install -U watersic-hf" in str(err.value)


# ------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_1000_generate_calls_do_not_grow_memory(seeded):
    model = AutoModelForCausalLM.from_pretrained(seeded["a"])
    linears = [m for m in model.modules() if isinstance(m, WaterSICLinear)]
    assert linears
    for m in linears:
        m.backend = "torch"

    def generate(i: int) -> None:
        # Distinct short prompts (lengths 2-4), greedy, batch 1.
        ids = torch.tensor([[4 + i % 97, 4 + (i * 7) % 113, 4 + (i * 13) % 89][: 2 + i % 3]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                             min_new_tokens=2, do_sample=False, pad_token_id=1)
        assert out.shape[1] == ids.shape[1] + 2

    with torch.inference_mode():
        for i in range(100):  # warm-up: caches, allocator pools, lazy imports
            generate(i)
        gc.collect()
        rss_start, objects_start = _rss_bytes(), len(gc.get_objects())
        for i in range(100, 800):
            generate(i)
        # Python-level allocations over the last 200 calls (tracemalloc slows each call).
        tracemalloc.start()
        try:
            gc.collect()
            traced_start = tracemalloc.get_traced_memory()[0]
            for i in range(800, 1000):
                generate(i)
            gc.collect()
            traced_growth = tracemalloc.get_traced_memory()[0] - traced_start
        finally:
            tracemalloc.stop()
        gc.collect()
        rss_growth = _rss_bytes() - rss_start
        objects_growth = len(gc.get_objects()) - objects_start
    logger.info("900 generate calls: RSS %+.2f MiB, traced (last 200) %+d B, objects %+d",
                rss_growth / 2**20, traced_growth, objects_growth)
    assert rss_growth < 20 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB over 900 calls"
    # A leaked 1x6x128 fp32 logits tensor per call alone would be ~600 KB over 200 calls.
    assert traced_growth < 256 * 2**10, f"traced Python memory grew by {traced_growth} B"
    assert objects_growth < 2000, f"{objects_growth} more live Python objects after 900 calls"
