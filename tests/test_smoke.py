"""Smoke tests: seconds-long checks that the package imports, registers and round-trips a model.

``pytest -k smoke`` runs only these; ``tests/test_repo_root.py`` runs them with
``python -m pytest -k smoke`` from the repository root, where the top-level ``kernels/`` folder
shadows the name ``kernels``.
"""

from __future__ import annotations

import torch
from _tiny import make_local_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

import watersic_hf


def test_smoke_import_registers_quantizer():
    assert AUTO_QUANTIZER_MAPPING["watersic"] is watersic_hf.WaterSICHfQuantizer
    import watersic_hf.kernels as k

    assert k.__name__ == "watersic_hf.kernels" and callable(k.triton_packed_matmul)


def test_smoke_quantize_save_reload(tmp_path):
    make_tiny_model("llama", tmp_path / "src")
    make_local_tokenizer(tmp_path / "src")
    ids = [torch.arange(16) % 100 + i for i in range(2)]
    cfg = watersic_hf.WaterSICConfig(bits=4, dataset=ids, seqlen=16, method="gptq")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=cfg)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(again.model.layers[0].self_attn.q_proj, watersic_hf.WaterSICLinear)
    x = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
