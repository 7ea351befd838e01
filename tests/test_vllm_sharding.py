"""Tensor-parallel splitting and fused forward of the vLLM plugin (plain torch, no vLLM needed).

The vLLM-facing half (``watersic_hf.vllm.plugin``) is tested in tests/test_vllm.py, which runs in
the vLLM virtual environment (scripts/run_vllm_tests.sh).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from watersic_hf.nn import WaterSICLinear
from watersic_hf.storage.checkpoint import WaterSICCheckpointLinear, materialize_layer
from watersic_hf.vllm.sharding import (
    ShardPlan,
    column_parallel_plan,
    fused_linear,
    row_parallel_plan,
    shard_linear,
)


def _layer(n: int, k: int, seed: int = 0) -> WaterSICLinear:
    """A packed layer with per-column spreads, a few escapes and fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.randn(k, generator=g))  # per-column code spread
    codes = torch.round(torch.randn(n, k, generator=g) * 3 * spread).to(torch.int32)
    codes[0, 0] = 900  # an escape
    qw = SimpleNamespace(codes=codes,
                         col_scale=(torch.rand(k, generator=g) + 0.5).half().float(),
                         row_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).half().float())
    return WaterSICLinear.from_quantized(qw, None, format="packed", backend="torch")


@pytest.mark.parametrize("n,k", [(40, 96), (33, 130)])
def test_row_parallel_two_way_split_sums_to_the_unsplit_layer(n, k):
    layer = _layer(n, k)
    x = torch.randn(5, k)
    parts = [shard_linear(layer, row_parallel_plan(k, r, 2)) for r in range(2)]
    assert all(p.in_features == k // 2 and p.out_features == n for p in parts)
    # each rank sees its slice of the input; the all-reduce is a sum
    y = sum(p(x[:, r * k // 2:(r + 1) * k // 2]) for r, p in enumerate(parts))
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    # the codes of each rank are exactly the stored codes' columns
    for r, p in enumerate(parts):
        assert torch.equal(p.codes(), layer.codes()[:, r * k // 2:(r + 1) * k // 2])


def test_row_parallel_at_k_not_a_multiple_of_the_group_size():
    # K = 2 · 48: each rank's 48 columns cross the 32-column width groups of the stored layout
    layer = _layer(64, 96, seed=3)
    x = torch.randn(3, 96)
    parts = [shard_linear(layer, row_parallel_plan(96, r, 2)) for r in range(2)]
    torch.testing.assert_close(parts[0](x[:, :48]) + parts[1](x[:, 48:]), layer(x),
                               rtol=1e-5, atol=1e-5)


def test_column_parallel_two_way_split_concatenates_to_the_unsplit_layer():
    layer = _layer(70, 64, seed=1)
    x = torch.randn(4, 64)
    parts = [shard_linear(layer, column_parallel_plan(70, [35], [r])) for r in range(2)]
    y = torch.cat([p(x) for p in parts], dim=-1)
    torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)


def test_column_parallel_of_a_stored_fused_matrix_splits_each_segment():
    # a checkpoint storing gate_up as one (2·48, K) matrix: rank r keeps gate[r] and up[r]
    layer = _layer(96, 32, seed=2)
    x = torch.randn(2, 32)
    full = layer(x)
    for r in range(2):
        plan = column_parallel_plan(96, [24, 24], [r, r])
        assert plan.rows == ((24 * r, 24), (48 + 24 * r, 24))
        y = shard_linear(layer, plan)(x)
        expected = torch.cat([full[:, 24 * r:24 * r + 24], full[:, 48 + 24 * r:72 + 24 * r]], -1)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_replicated_kv_heads_keep_the_whole_layer():
    # more ranks than KV heads: both ranks keep all rows (shard_rank = tp_rank // replicas = 0)
    assert column_parallel_plan(64, [64], [0]).is_identity
    layer = _layer(64, 32)
    assert shard_linear(layer, ShardPlan()) is layer


def test_fused_linear_is_the_concatenation_plus_bias():
    q, k, v = _layer(32, 48, 0), _layer(16, 48, 1), _layer(16, 48, 2)
    x = torch.randn(3, 7, 48, dtype=torch.bfloat16)
    bias = torch.randn(64)
    y = fused_linear(x, [q, k, v], bias)
    assert y.shape == (3, 7, 64) and y.dtype == torch.bfloat16
    expected = torch.cat([q(x), k(x), v(x)], dim=-1) + bias.to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_bad_plans_name_the_problem():
    with pytest.raises(ValueError, match="in_features=33 is not divisible"):
        row_parallel_plan(33, 0, 2)
    with pytest.raises(ValueError, match="tp_rank=2"):
        row_parallel_plan(32, 2, 2)
    with pytest.raises(ValueError, match="does not fit a segment of 40"):
        column_parallel_plan(40, [32], [1])
    with pytest.raises(ValueError, match="cannot be split into segments"):
        column_parallel_plan(100, [24, 24], [0, 0])


@pytest.mark.parametrize("storage", ["packed", "entropy"])
def test_materialize_layer_rebuilds_the_saved_layer(storage, tiny_llama_dir, tmp_path):
    """What the vLLM loader does with a layer's tensors read from the files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from watersic_hf import WaterSICConfig

    cfg = WaterSICConfig(bits=3, method="rtn", storage=storage, dataset=[[1, 2, 3, 4]] * 2,
                         nsamples=2, seqlen=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    qcfg = model.config.quantization_config
    name = "model.layers.1.mlp.down_proj"
    meta = qcfg.layers[name]
    tensors = {key[len(name) + 1:]: value for key, value in state.items()
               if key.startswith(name + ".")}
    assert set(tensors) == set(WaterSICCheckpointLinear.tensor_specs(meta, 2))
    built = materialize_layer(name, meta, tensors, version=2, backend="torch")
    original = model.get_submodule(name)
    assert torch.equal(built.codes(), original.codes())
    assert torch.equal(built.weight_col_scale, original.weight_col_scale)
    assert torch.equal(built.weight_row_scale, original.weight_row_scale)
    original.backend = "torch"  # same kernel on both sides: bit-identical outputs
    x = torch.randn(3, original.in_features)
    torch.testing.assert_close(built(x), original(x), rtol=0, atol=0)
    bad = dict(tensors, weight_col_scale=tensors["weight_col_scale"][:-1])
    with pytest.raises(ValueError, match=f"{name}.weight_col_scale is torch.float16"):
        materialize_layer(name, meta, bad, version=2)
    with pytest.raises(ValueError, match="the checkpoint has no"):
        materialize_layer(name, meta, {k: v for k, v in tensors.items() if k != "weight"})


def test_plugin_import_loads_neither_vllm_nor_numba():
    # vLLM imports the entry point's module before its CPU worker scans sys.modules, a scan that
    # fails on llvmlite (numba's backend): the package must not import numba until it computes
    code = ("import sys, watersic_hf, watersic_hf.vllm, watersic_hf.vllm.sharding, "
            "watersic_hf.storage.checkpoint; "
            "print(sorted(m for m in ('numba', 'llvmlite', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_vllm_entry_point_is_declared():
    import importlib.metadata

    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {(ep.name, ep.value) for ep in eps} >= {("watersic", "watersic_hf.vllm:register")}


def test_register_without_vllm_names_the_install_command():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    import watersic_hf.vllm

    with pytest.raises(ImportError, match=r"watersic-hf\[vllm\]"):
        watersic_hf.vllm.register()
