"""``transformers serve`` serves a saved WaterSIC folder, with no ``import watersic_hf`` anywhere.

The server runs in a subprocess on 127.0.0.1 (loopback only, a free port); one chat-completion
request must come back with the tokens the quantized model generates greedily in this process.
Random weights (an unregistered quantization method) would answer with other tokens.
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

import pytest
import torch
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from watersic_hf import WaterSICConfig, WaterSICLinear

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
MAX_TOKENS = 4
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("serve_src")
    make_tiny_model("llama", src)
    tokenizer = make_local_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg = WaterSICConfig(bits=4, dataset=list(CALIB_TEXTS) * 4, tokenizer=tokenizer, nsamples=4,
                         seqlen=16, method="gptq")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("served") / "tiny-watersic"
    model.save_pretrained(out)  # writes the calibration tokenizer, chat template included
    return out


def _expected_completion(folder) -> str:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model.model.layers[0].self_attn.o_proj, WaterSICLinear)
    inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def test_transformers_serve_answers_a_chat_completion(served_folder, tmp_path):
    expected = _expected_completion(served_folder)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "WATERSIC_NO_AUTOREGISTER")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [cli, "serve", str(served_folder), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"server exited early:\n{log_path.read_text()[-3000:]}"
            try:
                if json.loads(_get(f"{base}/health", timeout=2)).get("status") == "ok":
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S} s:\n" \
                                                f"{log_path.read_text()[-3000:]}"
            time.sleep(1)
        request = urllib.request.Request(
            f"{base}/v1/chat/completions",
            data=json.dumps({"model": str(served_folder), "messages": MESSAGES,
                             "max_tokens": MAX_TOKENS, "stream": False}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            reply = json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    log_text = log_path.read_text()
    assert "Unknown quantization type" not in log_text, log_text[-3000:]
    assert reply["usage"]["completion_tokens"] > 0
    assert reply["choices"][0]["message"]["content"] == expected
