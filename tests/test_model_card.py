"""watersic_hf.model_card: card content, atomic writing, the save hook."""

import pytest
import yaml
from _tiny import make_tiny_model

from watersic_hf.config import WaterSICConfig
from watersic_hf.model_card import (
    CARD_MARKER,
    install_save_hooks,
    quantization_summary,
    render_model_card,
    write_model_card,
)


def _config(**overrides):
    layers = {}
    for i in range(2):
        for name, shape, bits in (
            ("self_attn.q_proj", (64, 64), 3.1),
            ("mlp.down_proj", (128, 64), 2.9),
        ):
            layers[f"model.layers.{i}.{name}"] = {
                "in": shape[0],
                "out": shape[1],
                "bits": bits + i / 10,
            }
    kw = dict(
        bits=3.0,
        layers=layers,
        achieved_bits=3.0125,
        nsamples=16,
        seqlen=64,
        watersic_version="9.9",
    )
    kw.update(overrides)
    return WaterSICConfig(**kw)


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_summary_from_config_dict_and_model_config():
    cfg = _config()
    s = quantization_summary(cfg)
    assert s["n_layers"] == 4
    assert s["n_weights"] == 2 * (64 * 64 + 128 * 64)
    assert s["kinds"] == {"mlp.down_proj": 2, "self_attn.q_proj": 2}
    assert s["layer_bits_min"] == pytest.approx(2.9) and s["layer_bits_max"] == pytest.approx(3.2)
    assert quantization_summary(cfg.to_dict()) == s

    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="not quantized"):
        quantization_summary(model.config)
    model.config.quantization_config = cfg
    assert quantization_summary(model.config) == s
    with pytest.raises(ValueError, match="not 'watersic'"):
        quantization_summary({"quant_method": "gptq", "bits": 4})
    with pytest.raises(TypeError, match="WaterSICConfig"):
        quantization_summary(42)


def test_card_content():
    text = render_model_card(
        _config(),
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        repo_id="someone/smollm2-watersic-3bit",
        ppl=24.5,
        ppl_base=21.899,
        eval_protocol="first 4096 tokens, 512-token windows",
        bits_on_disk=3.21,
        tags=["smollm2"],
    )
    meta = _front_matter(text)
    assert meta["tags"] == ["watersic", "quantized", "smollm2"]
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert CARD_MARKER in text
    # The bold warning comes before the usage snippet, and the snippet starts with the import.
    warning = text.index("**Install `watersic-hf` before loading this model.**")
    assert "size-mismatch error" in text[warning : warning + 700]
    assert "`WATERSIC_NO_AUTOREGISTER=1`" in text[warning : warning + 700]
    snippet = text[text.index("```python") :]
    assert snippet.splitlines()[1].startswith("import watersic_hf")
    assert warning < text.index("```python")
    assert 'from_pretrained("someone/smollm2-watersic-3bit")' in snippet
    for fact in (
        "3.0125 bits/weight",
        "3.000 bits/weight",
        "| 4 (24,576 weights) |",
        "2.900 – 3.200",
        "24.500",
        "21.899",
        "3.210",
        "16 × 64 tokens",
        "watersic_hf 9.9",
        "first 4096 tokens, 512-token windows",
    ):
        assert fact in text, fact


def test_card_without_measurements_and_with_a_local_base(tmp_path):
    skips = ["lm_head", "model.embed_tokens", "model.layers.0.mlp"]
    text = render_model_card(
        _config(method="gptq", modules_to_not_convert=skips),
        base_model=str(tmp_path),
        model_path="./out",
    )
    assert "| kept in full precision | embeddings, `lm_head`, `model.layers.0.mlp`, norms" in text
    meta = _front_matter(text)
    assert "base_model" not in meta  # a local folder is no Hub id
    assert "gptq" in meta["tags"]
    assert "## Measured" in text  # the achieved rate is always known after calibration
    assert "perplexity" not in text
    assert 'from_pretrained("./out")' in text


def test_write_model_card_is_atomic_and_respects_foreign_readme(tmp_path):
    path = write_model_card(tmp_path, _config(), ppl=10.0)
    assert path == tmp_path / "README.md"
    assert CARD_MARKER in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left
    # Our own card is refreshed; a user's README survives keep_foreign=True.
    write_model_card(tmp_path, _config(), keep_foreign=True, ppl=11.0)
    assert "11.000" in path.read_text()
    path.write_text("my own card\n")
    assert write_model_card(tmp_path, _config(), keep_foreign=True) is None
    assert path.read_text() == "my own card\n"
    write_model_card(tmp_path, _config())
    assert CARD_MARKER in path.read_text()
    with pytest.raises(ValueError, match="not a folder"):
        write_model_card(tmp_path / "missing", _config())


def test_save_hook_writes_the_card(tmp_path):
    model = make_tiny_model("llama")
    model.config.quantization_config = _config()
    install_save_hooks(model)
    install_save_hooks(model)  # idempotent
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "import watersic_hf" in card and "3.0125" in card
    assert (tmp_path / "a" / "model.safetensors").exists()
    # Not on a non-main process of a distributed save.
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b" / "README.md").exists()
    # A plain model without the hook writes no card.
    plain = make_tiny_model("llama")
    plain.save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c" / "README.md").exists()
