"""What ``save_pretrained`` of a freshly quantized model writes: the calibration tokenizer (so that
``pipeline(model=folder)`` works) and a model card whose usage snippet runs against the folder, with
the base model, the calibration set and the measured bits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM, pipeline

from watersic_hf import WaterSICConfig
from watersic_hf.evaluation import disk_bits
from watersic_hf.model_card import base_model_origin


def _front_matter(text: str) -> dict:
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama in a Hugging Face cache layout, quantized with text calibration and the
    tokenizer found next to it (none passed), then saved with plain save_pretrained."""
    root = tmp_path_factory.mktemp("hub_cache")
    src = root / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    make_tiny_model("llama", src)
    make_local_tokenizer(src)
    cfg = WaterSICConfig(bits=4, dataset=list(CALIB_TEXTS) * 4, nsamples=8, seqlen=16,
                         method="gptq", damp=0.05)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("saved") / "tiny-watersic"
    model.save_pretrained(out)
    return model, out


def test_tokenizer_travels_with_the_model(saved):
    model, out = saved
    assert (out / "tokenizer_config.json").exists() and (out / "tokenizer.json").exists()
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("the quick brown fox", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick brown fox")
    ids = gen.tokenizer("the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gen.model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_tokenizer_already_in_the_folder_is_kept(saved, tmp_path):
    model, _ = saved
    make_local_tokenizer(tmp_path, texts=["only these words here"], vocab_size=16)
    before = (tmp_path / "tokenizer.json").read_bytes()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before


def test_model_card_snippet_runs_against_the_saved_folder(saved, tmp_path):
    _, out = saved
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert snippet.startswith("import watersic_hf") and f'"{out}"' in snippet
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # the decoded generation


def test_model_card_facts(saved):
    model, out = saved
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    # The origin of a local folder in the Hub cache layout is known.
    assert meta["base_model"] == "acme/tiny-llama" and meta["base_model_relation"] == "quantized"
    qc = model.config.quantization_config
    assert qc.calibration_data == "24 user-supplied texts"
    assert f"| calibration set | {qc.calibration_tokens:,} tokens (8 windows × 16 tokens asked) " \
           "from 24 user-supplied texts |" in card
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert stored["calibration_data"] == "24 user-supplied texts"
    on_disk = disk_bits(out)["bits_per_weight"]
    assert f"| bits on disk (file bytes × 8 / quantized weights) | {on_disk:.3f} |" in card
    assert "| bits in memory (resident bytes × 8 / quantized weights) |" in card
    # A user-given id wins and is remembered for later saves.
    model.save_pretrained(out.parent / "again", base_model="someone/original")
    again = _front_matter((out.parent / "again" / "README.md").read_text())
    assert again["base_model"] == "someone/original"


def test_base_model_origin(tmp_path):
    assert base_model_origin("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_origin(None) is None
    cached = tmp_path / "models--org--name" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert base_model_origin(str(cached)) == "org/name"
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "org/other"}))
    assert base_model_origin(recorded) == "org/other"
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "/fsx/run/ckpt"}))
    assert base_model_origin(recorded) == str(recorded)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert base_model_origin(plain) == str(plain)
