"""Entropy-coded checkpoints end to end: save_pretrained / from_pretrained in both storage modes,
corruption and truncation errors, ``watersic_hf.report`` and a golden checkpoint pinning the format.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import watersic_hf
from watersic_hf import WaterSICConfig, WaterSICLinear
from watersic_hf.packing import CODE_TENSOR_NAMES

TESTS = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(TESTS, "golden", "tiny_entropy_v1")
VOCAB = 128
EVAL_IDS = torch.tensor([[3, 17, 99, 4, 56, 8, 120, 1, 77, 30, 2, 64]])


def _set_storage(model, storage: str) -> None:
    model.config.quantization_config.storage = storage
    model.hf_quantizer.quantization_config.storage = storage


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama quantized at 3 bits, its logits, and its checkpoints in both storages."""
    torch.set_num_threads(1)
    src = tmp_path_factory.mktemp("src")
    make_tiny_model("llama", src)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(4)]
    cfg = WaterSICConfig(bits=3, dataset=ids, nsamples=4, seqlen=16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    with torch.no_grad():
        logits = model(EVAL_IDS).logits
    dirs = {}
    for storage in ("entropy", "packed"):
        _set_storage(model, storage)
        dirs[storage] = tmp_path_factory.mktemp(storage)
        model.save_pretrained(dirs[storage])
    _set_storage(model, "entropy")
    return model, logits, dirs


def _keys(path) -> list[str]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_fresh_process_load_gives_identical_logits_in_both_storages(saved, tmp_path):
    _, logits, dirs = saved
    out = tmp_path / "logits.pt"
    code = f"""
        import torch, watersic_hf
        from transformers import AutoModelForCausalLM
        res = {{}}
        for name, path in {json.dumps({k: str(v) for k, v in dirs.items()})}.items():
            m = AutoModelForCausalLM.from_pretrained(path)
            n = sum(isinstance(x, watersic_hf.WaterSICLinear) for x in m.modules())
            with torch.no_grad():
                res[name] = (n, m(torch.tensor({EVAL_IDS.tolist()})).logits)
        torch.save(res, {str(out)!r})
    """
    env = {**os.environ, "PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out)
    for storage in ("entropy", "packed"):
        n, got = res[storage]
        assert n == 14, storage  # 2 blocks x 7 Linears
        torch.testing.assert_close(got, logits, rtol=0, atol=0, msg=storage)


def test_entropy_checkpoint_stores_streams_not_packed_codes(saved):
    model, _, dirs = saved
    keys = _keys(dirs["entropy"])
    name = "model.layers.0.self_attn.q_proj"
    assert f"{name}.codes_stream" in keys and f"{name}.codes_model" in keys
    assert f"{name}.weight_col_scale" in keys and f"{name}.weight_row_scale" in keys
    # format 2 keeps the packing layout chosen at quantization time, not the packed words
    layout_keys = ("weight_perm", "weight_group_meta")
    assert f"{name}.weight_perm" in keys and f"{name}.weight_group_meta" in keys
    stored_words = tuple(n for n in CODE_TENSOR_NAMES if n not in layout_keys)
    assert not any(k.endswith(stored_words) for k in keys)
    packed_keys = _keys(dirs["packed"])
    assert f"{name}.weight_packed" in packed_keys
    assert not any(k.endswith("codes_stream") for k in packed_keys)
    qc = json.load(open(os.path.join(dirs["entropy"], "config.json")))["quantization_config"]
    assert qc["format_version"] == 2
    assert qc["layers"][name]["storage"] == "entropy"
    assert set(qc["layers"][name]["entropy"]["xxh3_64"]) == {"stream", "model"}
    # every tensor of the file has a checksum, and nothing else does
    assert set(qc["checksums"]["tensors"]) == set(keys)
    assert qc["report"]["bits_on_disk"] > 0 and "layers" not in qc["report"]
    qp = json.load(open(os.path.join(dirs["packed"], "config.json")))["quantization_config"]
    assert qp["layers"][name]["storage"] == "packed" and "entropy" not in qp["layers"][name]
    # honest bound on a 64-wide model: the streams beat the fixed-width packing on disk
    assert qc["report"]["bits_on_disk"] < qp["report"]["bits_on_disk"]
    size = {k: os.path.getsize(os.path.join(v, "model.safetensors")) for k, v in dirs.items()}
    assert size["entropy"] < size["packed"]


def test_report_keys_and_weighted_means(saved):
    model, _, _ = saved
    rep = watersic_hf.report(model)
    keys = {"entropy_bits", "entropy_bits_per_column", "bits_on_disk", "bits_in_memory",
            "rate_bits"}
    assert keys <= set(rep) and len(rep["layers"]) == 14
    weights = {n: m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, WaterSICLinear)}
    for key in keys:
        mean = sum(rep["layers"][n][key] * w for n, w in weights.items()) / sum(weights.values())
        assert rep[key] == pytest.approx(mean, abs=1e-6), key
    # the calibration's accounted rate is reported when known
    assert rep["rate_bits"] == pytest.approx(model.config.quantization_config.achieved_bits,
                                             abs=1e-3)
    assert rep["bits_on_disk"] < rep["bits_in_memory"]


class _Wrap(torch.nn.Module):
    def __init__(self, layer: WaterSICLinear) -> None:
        super().__init__()
        self.layer = layer


class _Q:
    def __init__(self, codes, col, row) -> None:
        self.codes, self.col_scale, self.row_scale = codes, col, row


def test_bits_on_disk_close_to_per_column_entropy_on_a_large_layer():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 1024, 256
    spread = torch.linspace(0.3, 4.0, in_f)
    codes = torch.round(torch.randn(out_f, in_f, generator=g) * spread).to(torch.int32)
    col = (torch.rand(in_f, generator=g) + 0.5).half().float()
    row = (torch.rand(out_f, generator=g) + 0.5).half().float()
    model = _Wrap(WaterSICLinear.from_quantized(_Q(codes, col, row), None, backend="torch"))
    rep = watersic_hf.report(model, storage="entropy")
    # format 2 also stores the packing layout: int16 permutation + 8 int32 per 32-column group
    layout_bits = 16 / out_f + 8 * 32 / (32 * out_f)
    bound = rep["entropy_bits_per_column"] + 0.05 + 16 / in_f + 16 / out_f + layout_bits
    assert rep["bits_on_disk"] <= bound, (rep["bits_on_disk"], bound)
    packed = watersic_hf.report(model, storage="packed")
    assert packed["bits_on_disk"] > rep["bits_on_disk"]


def _tensor_range(path: str, key: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_corrupt_stream_raises_naming_the_tensor(saved, tmp_path):
    _, _, dirs = saved
    bad = tmp_path / "bad"
    shutil.copytree(dirs["entropy"], bad)
    path = str(bad / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.codes_stream"
    start, end = _tensor_range(path, key)
    with open(path, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_truncated_file_raises_a_clear_error(saved, tmp_path):
    _, _, dirs = saved
    bad = tmp_path / "trunc"
    shutil.copytree(dirs["entropy"], bad)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(bad)
    msg = str(info.value).lower()
    assert any(word in msg for word in ("incomplete", "truncat", "metadata", "header", "size")), msg


def test_golden_checkpoint_loads_to_stored_logits():
    with open(os.path.join(GOLDEN, "expected_logits.json")) as f:
        expected = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(GOLDEN)
    assert sum(isinstance(m, WaterSICLinear) for m in model.modules()) == 7
    with torch.no_grad():
        logits = model(torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-5)
