"""``generate`` with a static cache and a ``compile_config`` runs the compiled forward.

transformers skips compilation unless the quantizer says ``is_compileable``. On CPU it also only
compiles when ``compile_config._compile_all_devices`` is set (its own tests do the same). The CPU
test compiles with a recording backend: TorchDynamo captures the whole forward (``fullgraph=True``)
and hands the graph to it, without Inductor's C++ code generation (over a minute on 2 cores).
"""

from __future__ import annotations

import logging

import pytest
import torch
from _tiny import make_tiny_model
from transformers import AutoModelForCausalLM, CompileConfig

from watersic_hf import WaterSICConfig, WaterSICLinear

PROMPT = torch.tensor([[3, 9, 14, 2]])


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    src = tmp_path_factory.mktemp("compile_src")
    make_tiny_model("llama", src)
    ids = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
           for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=WaterSICConfig(bits=4, dataset=ids, seqlen=16, method="gptq"))
    out = tmp_path_factory.mktemp("compile_q")
    model.save_pretrained(out)
    return out


def _generate(model, compile_config=None):
    return model.generate(
        PROMPT.to(model.device), max_new_tokens=6, do_sample=False,
        cache_implementation="static", compile_config=compile_config,
        disable_compile=compile_config is None,
    )


def test_static_cache_generate_runs_compiled_on_cpu(reloaded, caplog):
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(reloaded)
    assert isinstance(model.model.layers[0].mlp.down_proj, WaterSICLinear)
    assert model.hf_quantizer.is_compileable
    eager = _generate(model)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cc = CompileConfig(fullgraph=True, backend=recording_backend, mode="default", dynamic=False)
    cc._compile_all_devices = True
    with caplog.at_level(logging.WARNING, logger="transformers"):
        compiled = _generate(model, cc)
    assert "unable to meet the criteria for compilation" not in caplog.text
    assert graphs, "generate did not compile the forward"
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("watersic" in t for t in targets), sorted(targets)  # our layers are in the graph
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_static_cache_generate_runs_compiled_on_cuda(reloaded):
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(reloaded, device_map="cuda",
                                                 dtype=torch.bfloat16)
    eager = _generate(model)
    cc = CompileConfig(fullgraph=True)  # Inductor; CUDA needs no _compile_all_devices
    compiled = _generate(model, cc)
    assert hasattr(model, "_compiled_call")
    # bf16 Inductor kernels may round differently; greedy tokens agree on a 4-token prompt.
    assert (compiled == eager).float().mean() > 0.8
