"""WaterSICLinear: function, construction, skeleton round trip, backends, tiny models."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from _tiny import make_tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from watersic_hf import packing
from watersic_hf._triton import HAS_TRITON, interpreter_enabled
from watersic_hf.nn import WaterSICLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton tests' device
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreter_enabled()),
    reason="needs Triton with a GPU or TRITON_INTERPRET=1",
)


def fake_qw(out_f: int, in_f: int, *, seed: int = 0, dead: tuple[int, ...] = ()) -> SimpleNamespace:
    """QuantizedWeight-like codes with per-column spreads and fp16-exact scales."""
    gen = torch.Generator().manual_seed(seed)
    col = 3.0 * torch.exp(0.7 * torch.randn(in_f, generator=gen))
    codes = (torch.randn(out_f, in_f, generator=gen) * col).round().to(torch.int32)
    col_scale = (torch.rand(in_f, generator=gen) * 0.01 + 1e-3).half().float()
    if dead:
        codes[:, list(dead)] = 0
        col_scale[list(dead)] = 0
    row_scale = (torch.rand(out_f, generator=gen) + 0.5).half().float()
    return SimpleNamespace(codes=codes, col_scale=col_scale, row_scale=row_scale,
                           dead_columns=torch.tensor(dead, dtype=torch.int64))


def reference(qw: SimpleNamespace, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = qw.row_scale.double() * ((x.double() * qw.col_scale.double()) @ qw.codes.double().t())
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("fmt", ["packed", "plain"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_matches_formula_and_dequantized_linear(fmt, has_bias):
    qw = fake_qw(37, 70, seed=1, dead=(5,))
    bias = torch.randn(37) if has_bias else None
    m = WaterSICLinear.from_quantized(qw, bias, format=fmt, backend="torch")
    x = torch.randn(2, 3, 70)
    y = m(x)
    assert y.shape == (2, 3, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(qw, x, bias), atol=1e-4, rtol=1e-5)
    lin = m.dequantize()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin(x), y, atol=1e-4, rtol=1e-5)
    assert torch.equal(m.codes(), qw.codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_activations_keep_their_dtype(dtype):
    qw = fake_qw(24, 40, seed=2)
    m = WaterSICLinear.from_quantized(qw, torch.randn(24), dtype=dtype, backend="torch")
    assert m.bias.dtype == dtype
    x = torch.randn(5, 40).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(qw, x, m.bias), atol=5e-2, rtol=2e-2)


def test_dtype_casts_keep_fp16_scales():
    qw = fake_qw(24, 40, seed=7)
    m = WaterSICLinear.from_quantized(qw, torch.randn(24), backend="torch")
    x = torch.randn(3, 40)
    ref = m(x)
    m.to(torch.bfloat16)
    assert m.weight_col_scale.dtype == m.weight_row_scale.dtype == torch.float16
    assert m.bias.dtype == torch.bfloat16 and m.weight_packed.dtype == torch.int32
    assert torch.equal(m.weight_col_scale.float(), qw.col_scale)  # not rounded to bf16
    torch.testing.assert_close(m(x.bfloat16()).float(), ref, atol=5e-2, rtol=2e-2)
    m.to("meta")
    assert m.weight_col_scale.is_meta and m.weight_col_scale.dtype == torch.float16


def test_module_contract():
    m = WaterSICLinear.from_quantized(fake_qw(16, 48), torch.zeros(16), backend="torch")
    assert not isinstance(m, nn.Linear)
    assert (m.in_features, m.out_features) == (48, 16)
    assert list(m.buffers()) == []
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.endswith(("weight_g", "weight_v")) for n in names)
    assert all(not p.requires_grad for p in m.parameters())
    assert m.weight_col_scale.dtype == m.weight_row_scale.dtype == torch.float16
    expected = {*packing.CODE_TENSOR_NAMES, "weight_col_scale", "weight_row_scale", "bias"}
    assert set(names) == expected
    assert "format=packed" in repr(m)


def test_bits_in_memory_counts_every_weight_tensor():
    qw = fake_qw(64, 256, seed=3)
    packed = WaterSICLinear.from_quantized(qw, None)
    plain = WaterSICLinear.from_quantized(qw, None, format="plain")
    nbytes = sum(p.numel() * p.element_size() for p in packed.parameters())
    assert packed.bits_in_memory == pytest.approx(8 * nbytes / (64 * 256))
    assert plain.bits_in_memory == pytest.approx(32 + 16 / 64 + 16 / 256)
    assert packed.bits_in_memory < 8


@pytest.mark.parametrize("fmt", ["packed", "plain"])
def test_layout_metadata_rebuilds_a_meta_skeleton(fmt, tmp_path):
    qw = fake_qw(33, 65, seed=4)
    m = WaterSICLinear.from_quantized(qw, torch.randn(33), format=fmt, dtype=torch.bfloat16)
    layout = json.loads(json.dumps(m.layout_metadata()))  # what the config stores
    assert all(isinstance(v, int | str) for v in layout.values())
    skeleton = WaterSICLinear(65, 33, True, layout, dtype=torch.bfloat16, device="meta")
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), skeleton.named_parameters(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and p1.dtype == p2.dtype and p2.is_meta
    path = tmp_path / "layer.safetensors"
    save_file(m.state_dict(), str(path))
    skeleton = skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(4, 65)
    assert torch.equal(skeleton(x), m(x))
    assert torch.equal(skeleton.codes(), qw.codes)


def test_from_quantized_rejects_bad_input():
    qw = fake_qw(8, 40)
    bad = SimpleNamespace(**{**vars(qw), "col_scale": qw.col_scale + 1e-5})
    with pytest.raises(ValueError, match="fp16"):
        WaterSICLinear.from_quantized(bad, None)
    bad = SimpleNamespace(**{**vars(qw), "row_scale": torch.ones(9)})
    with pytest.raises(ValueError, match="row_scale"):
        WaterSICLinear.from_quantized(bad, None)
    bad = SimpleNamespace(**{**vars(qw), "dead_columns": torch.tensor([3])})
    with pytest.raises(ValueError, match="dead_columns"):
        WaterSICLinear.from_quantized(bad, None)
    bad = SimpleNamespace(**{**vars(qw), "codes": qw.codes.float()})
    with pytest.raises(TypeError, match="integer"):
        WaterSICLinear.from_quantized(bad, None)
    with pytest.raises(ValueError, match="format"):
        WaterSICLinear.from_quantized(qw, None, format="int4")
    with pytest.raises(ValueError, match="bias"):
        WaterSICLinear.from_quantized(qw, torch.zeros(7))
    with pytest.raises(ValueError, match="layout"):
        WaterSICLinear(40, 8, False, {"format": "gptq"})
    m = WaterSICLinear.from_quantized(qw, None)
    with pytest.raises(ValueError, match="40"):
        m(torch.randn(2, 41))


def test_backend_setting_and_environment(monkeypatch):
    m = WaterSICLinear.from_quantized(fake_qw(8, 40), None)
    assert m.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        m.backend = "cuda"
    m.backend = "TORCH"
    assert m.backend == "torch"
    monkeypatch.setenv("WATERSIC_BACKEND", "fast")
    with pytest.raises(ValueError, match="WATERSIC_BACKEND"):
        m(torch.randn(1, 40))
    if HAS_TRITON and not torch.cuda.is_available():
        monkeypatch.setenv("WATERSIC_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            m(torch.randn(1, 40))


@needs_triton
def test_triton_backend_matches_torch_backend(monkeypatch):
    qw = fake_qw(50, 90, seed=5)
    m = WaterSICLinear.from_quantized(qw, torch.randn(50), backend="torch").to(DEVICE)
    x = torch.randn(3, 90, device=DEVICE)
    ref = m(x)
    monkeypatch.setenv("WATERSIC_BACKEND", "triton")  # the environment overrides the module
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)


def _quantize_like_watersic(linear: nn.Linear, seed: int) -> SimpleNamespace:
    """Synthetic codes for a real layer: fp16 row/column scales, rounding (no calibration)."""
    w = linear.weight.detach().float()
    gen = torch.Generator().manual_seed(seed)
    col_scale = (w.abs().mean(0) / 3 * (1 + 0.5 * torch.rand(w.shape[1], generator=gen)))
    row_scale = (w.abs().mean(1) / w.abs().mean()).half().float()
    col_scale = col_scale.half().float()
    codes = torch.round(w / (row_scale[:, None] * col_scale[None, :])).to(torch.int32)
    return SimpleNamespace(codes=codes, col_scale=col_scale, row_scale=row_scale,
                           dead_columns=torch.empty(0, dtype=torch.int64))


def _swap_linears(model: nn.Module, fmt: str, backend: str) -> int:
    swapped = 0
    for i, layer in enumerate(model.model.layers):
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                qw = _quantize_like_watersic(child, seed=100 * i + swapped)
                new = WaterSICLinear.from_quantized(qw, child.bias, format=fmt, backend=backend)
                setattr(parent, name.rsplit(".", 1)[-1], new)
                swapped += 1
    return swapped


@pytest.fixture(scope="module")
def tiny_models():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for fmt in ("packed", "plain"):
        model = make_tiny_model("llama")
        assert _swap_linears(model, fmt, "torch") == 14
        out[fmt] = model
    return out, ids


def test_tiny_model_packed_logits_equal_unpacked(tiny_models):
    models, ids = tiny_models
    with torch.no_grad():
        packed = models["packed"](ids).logits
        plain = models["plain"](ids).logits
    assert torch.isfinite(packed).all()
    # both run fp32 matmuls on identical codes and scales: bitwise equal
    assert torch.equal(packed, plain)


@needs_triton
def test_tiny_model_through_triton_kernels(tiny_models, monkeypatch):
    models, ids = tiny_models
    packed = copy.deepcopy(models["packed"]).to(DEVICE)
    with torch.no_grad():
        ref = models["plain"](ids).logits
        monkeypatch.setenv("WATERSIC_BACKEND", "triton")
        out = packed(ids.to(DEVICE)).logits.cpu()
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_tiny_model_compiles_fullgraph(tiny_models):
    models, ids = tiny_models
    model = models["packed"]
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_single_layer_compiles_with_inductor():
    m = WaterSICLinear.from_quantized(fake_qw(32, 64, seed=6), torch.randn(32), backend="torch")
    x = torch.randn(3, 64)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
