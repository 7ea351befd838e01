"""Training through WaterSICLinear: the autograd formula of the packed op, and QLoRA-style LoRA.

The gradients of every backend (torch twin, numba CPU kernels, Triton under its interpreter) and
of the plain format are compared with autograd through a dense fp64 reference; the LoRA tests
quantize a tiny Llama, train adapters with `transformers.Trainer` and reload them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from watersic_hf._numba import HAS_NUMBA
from watersic_hf._triton import HAS_TRITON, interpreter_enabled
from watersic_hf.nn import WaterSICLinear

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreter_enabled()),
    reason="needs Triton with a GPU or TRITON_INTERPRET=1",
)
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="needs numba (the CPU kernels)")

# (format, backend) pairs: every forward implementation the layer can run
PATHS = [
    pytest.param("plain", "torch", id="plain"),
    pytest.param("packed", "torch", id="packed-torch"),
    pytest.param("packed", "cpu", id="packed-cpu", marks=needs_numba),
    pytest.param("packed", "triton", id="packed-triton", marks=needs_triton),
]


def fake_qw(out_f: int, in_f: int, *, seed: int) -> SimpleNamespace:
    """QuantizedWeight-like codes with wide per-column spreads (so the packer uses escapes)
    and fp16-exact scales."""
    gen = torch.Generator().manual_seed(seed)
    spread = 3.0 * torch.exp(0.9 * torch.randn(in_f, generator=gen))
    codes = (torch.randn(out_f, in_f, generator=gen) * spread).round().to(torch.int32)
    col_scale = (torch.rand(in_f, generator=gen) * 0.01 + 1e-3).half().float()
    row_scale = (torch.rand(out_f, generator=gen) + 0.5).half().float()
    return SimpleNamespace(codes=codes, col_scale=col_scale, row_scale=row_scale)


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _layer(fmt: str, backend: str, *, has_bias: bool, scale_dtype: torch.dtype,
           seed: int = 0) -> tuple[WaterSICLinear, SimpleNamespace]:
    qw = fake_qw(37, 70, seed=seed)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(seed + 1)) if has_bias else None
    m = WaterSICLinear.from_quantized(qw, bias, format=fmt, backend=backend).to(_device(backend))
    if scale_dtype != torch.float16:
        # what scale fine-tuning does: the scales become trainable tensors of another dtype
        for name in ("weight_col_scale", "weight_row_scale"):
            setattr(m, name, nn.Parameter(getattr(m, name).to(scale_dtype), requires_grad=False))
    return m, qw


def _dense_grads(qw: SimpleNamespace, x: torch.Tensor, bias: torch.Tensor | None,
                 w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd of ``sum(w · y)`` through the dense fp64 formula, w.r.t. x, scales and bias."""
    leaves = {
        "x": x.detach().double().requires_grad_(True),
        "col": qw.col_scale.double().requires_grad_(True),
        "row": qw.row_scale.double().requires_grad_(True),
    }
    if bias is not None:
        leaves["bias"] = bias.detach().double().requires_grad_(True)
    weight = leaves["row"][:, None] * qw.codes.double() * leaves["col"][None, :]
    y = leaves["x"] @ weight.t()
    if bias is not None:
        y = y + leaves["bias"]
    (y * w.double()).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("fmt,backend", PATHS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_dense_fp64_reference(fmt, backend, scale_dtype, has_bias):
    m, qw = _layer(fmt, backend, has_bias=has_bias, scale_dtype=scale_dtype)
    dev = m.weight_col_scale.device
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 70, generator=gen).to(dev).requires_grad_(True)
    w = torch.randn(2, 3, 37, generator=gen).to(dev)
    wanted = {"x": x, "col": m.weight_col_scale, "row": m.weight_row_scale}
    if has_bias:
        wanted["bias"] = m.bias
    for t in wanted.values():
        t.requires_grad_(True)
    y = m(x)
    got = dict(zip(wanted, torch.autograd.grad((y * w).sum(), list(wanted.values())), strict=True))
    ref = _dense_grads(qw, x.cpu(), m.bias.cpu() if has_bias else None, w.cpu())
    assert set(got) == set(ref)
    for name, g in got.items():
        assert g.dtype == wanted[name].dtype, f"grad of {name} is {g.dtype}"
        assert g.shape == wanted[name].shape
        # fp16 scale gradients carry fp16 rounding (2^-11 relative); the rest fp32 sums
        tol = 2e-3 if g.dtype == torch.float16 else 2e-5
        torch.testing.assert_close(g.cpu().double(), ref[name], rtol=tol, atol=tol * ref[name]
                                   .abs().max().item(), msg=lambda s, n=name: f"{n}: {s}")
    # the integer code tensors never take part in autograd
    for name, p in m.named_parameters():
        if not p.dtype.is_floating_point:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("fmt,backend", PATHS)
def test_scale_gradients_without_input_gradient(fmt, backend):
    # x not requiring grad (the first layer of a model) must still reach the op's autograd
    # formula, not the CPU fast path that only serves calls with nothing to differentiate
    m, qw = _layer(fmt, backend, has_bias=True, scale_dtype=torch.float32, seed=4)
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(5)).to(m.bias.device)
    m.weight_col_scale.requires_grad_(True)
    y = m(x)
    assert y.requires_grad
    y.square().sum().backward()
    assert m.weight_col_scale.grad is not None and m.weight_col_scale.grad.dtype == torch.float32
    assert m.weight_row_scale.grad is None and m.bias.grad is None
    ref_y = qw.row_scale.double() * ((x.cpu().double() * qw.col_scale.double())
                                    @ qw.codes.double().t()) + m.bias.detach().cpu().double()
    ref = _dense_grads(qw, x.cpu(), m.bias.detach().cpu(), 2 * ref_y)["col"]
    torch.testing.assert_close(m.weight_col_scale.grad.cpu().double(), ref, rtol=1e-4,
                               atol=1e-4 * ref.abs().max().item())


def test_packed_and_plain_gradients_are_equal():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 70, generator=gen)
    grads = []
    for fmt in ("packed", "plain"):
        m, _ = _layer(fmt, "torch", has_bias=True, scale_dtype=torch.float32, seed=6)
        xi = x.clone().requires_grad_(True)
        params = [xi, m.weight_col_scale, m.weight_row_scale, m.bias]
        for p in params:
            p.requires_grad_(True)
        grads.append(torch.autograd.grad(m(xi).sin().sum(), params))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_frozen_layer_passes_input_gradients_only():
    # the LoRA setting: the quantized layer is frozen, the activations carry gradients
    m, qw = _layer("packed", "torch", has_bias=True, scale_dtype=torch.float16, seed=8)
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.randn(3, 70, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in m.parameters())
    ref = _dense_grads(qw, x, m.bias, torch.ones(3, 37))["x"]
    torch.testing.assert_close(x.grad.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


# ------------------------------------------------------------------------------ LoRA via PEFT
VOCAB = 128


def _pattern_batch(n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences that cycle through 8 fixed tokens (``t[i+1] = 10 + (t[i] - 10 + 3) mod 8``)
    from random starts: a rule of rank <= 8 the adapters can learn, hence a loss that falls."""
    starts = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(seed))
    steps = torch.arange(length) * 3
    return 10 + (starts[:, None] + steps[None, :]) % 8


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A tiny Llama quantized on load (RTN, 4 bits: no calibration passes) and saved."""
    from _tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    from watersic_hf import WaterSICConfig

    src = tmp_path_factory.mktemp("lora_src")
    # initializer_range 0.1 instead of 0.02: with a near-zero frozen LM head no adapter could
    # move the logits far enough to show learning in a few steps
    make_tiny_model("llama", src, initializer_range=0.1)
    cfg = WaterSICConfig(bits=4, method="rtn", dataset=[list(range(16))] * 2, nsamples=2,
                         seqlen=16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("lora_quantized")
    model.save_pretrained(out)
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every WaterSICLinear tensor, by name in the bare model (PEFT's wrapping
    prefixes ``base_model.model.`` and nests the layer as ``base_layer``)."""
    def bare(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    return {f"{bare(name)}.{pname}": p.detach().clone()
            for name, m in model.named_modules() if isinstance(m, WaterSICLinear)
            for pname, p in m.named_parameters(recurse=False)}


def test_lora_trains_with_trainer_and_reloads(quantized_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import watersic_hf

    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_qat_trainable
    before = _snapshot(model)
    assert before and not any(
        p.requires_grad for m in model.modules() if isinstance(m, WaterSICLinear)
        for p in m.parameters())
    config = watersic_hf.register_lora(peft.LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM"))
    model = peft.get_peft_model(model, config)
    wrapped = [m for m in model.modules() if isinstance(m, watersic_hf.integration.peft
                                                        .WaterSICLoraLinear)]
    assert len(wrapped) == 4  # q_proj and v_proj of both blocks
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = _pattern_batch(16, 24, seed=0)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=24, per_device_train_batch_size=8,
        learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 24
    # ~ln(128) = 4.85 at the start; the adapters learn the rule (measured: ~1.1 after 24 steps)
    assert losses[-1] < 0.5 * losses[0], losses

    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed during LoRA training"

    model.eval()
    probe = _pattern_batch(2, 12, seed=1)
    with torch.no_grad():
        trained_logits = model(probe).logits
    model.save_pretrained(tmp_path / "adapter")

    fresh = AutoModelForCausalLM.from_pretrained(quantized_dir)
    with torch.no_grad():
        base_logits = fresh(probe).logits
    reloaded = peft.PeftModel.from_pretrained(
        fresh, tmp_path / "adapter",
        config=watersic_hf.register_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter")))
    reloaded.eval()
    with torch.no_grad():
        reloaded_logits = reloaded(probe).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-5, atol=1e-5)
    # the adapter matters: the base alone gives other logits
    assert (base_logits - trained_logits).abs().max() > 1e-2



class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_lora_layer_function_and_refusals():
    peft = pytest.importorskip("peft")
    import watersic_hf

    m, _ = _layer("packed", "auto", has_bias=True, scale_dtype=torch.float16, seed=9)
    model = peft.get_peft_model(_OneLayer(m), watersic_hf.register_lora(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights="gaussian")))
    lora = model.base_model.model.proj
    assert isinstance(lora, watersic_hf.integration.peft.WaterSICLoraLinear)
    assert (lora.in_features, lora.out_features) == (70, 37)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    x = torch.randn(3, 70)
    delta = x @ lora.get_delta_weight("default").t()
    torch.testing.assert_close(model(x), m(x) + delta, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), m(x))
    with pytest.raises(NotImplementedError, match="cannot be merged into a WaterSICLinear"):
        model.merge_and_unload()

    with pytest.raises(ValueError, match="plain LoRA only"):
        peft.get_peft_model(_OneLayer(_copy_layer(m)), watersic_hf.register_lora(
            peft.LoraConfig(target_modules=["proj"], use_dora=True)))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(_OneLayer(_copy_layer(m)), watersic_hf.register_lora(
            peft.LoraConfig(target_modules=["proj"], init_lora_weights="pissa")))
    with pytest.raises(TypeError, match="takes a peft.LoraConfig; got dict"):
        watersic_hf.register_lora({"target_modules": ["proj"]})


def _copy_layer(m: WaterSICLinear) -> WaterSICLinear:
    return WaterSICLinear.from_tensors(
        m.in_features, m.out_features, m.layout_metadata(),
        {n: p for n, p in m.named_parameters() if n != "bias"}, m.bias)


def test_import_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, watersic_hf; assert 'peft' not in sys.modules, 'peft imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
