"""Tiny random transformers models and a local tokenizer, built inside the tests (no hub access)."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CALIB_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model is enough to test the quantizer end to end",
    "calibration data flows through every decoder block in turn",
    "weights are stored as integer codes with per row and per column scales",
    "the state of the union is strong and the people are free",
    "every linear layer gets its own rate and its own error feedback",
]

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2"),
    "phi3": dict(model_type="phi3", pad_token_id=0),
    "gemma2": dict(model_type="gemma2", head_dim=16),
}


def tiny_config(family: str = "llama", *, tie: bool = False, **overrides):
    """Config of a 2-block random model of the given family (64 hidden, 128 vocab)."""
    kw = dict(_COMMON)
    kw.update(FAMILIES[family])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, tie_word_embeddings=tie, **kw)


def make_tiny_model(family: str, path: str | os.PathLike[str] | None = None, *, tie: bool = False,
                    seed: int = 0, **overrides):
    """Build (and optionally save) a tiny random causal LM in fp32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie=tie, **overrides)).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def make_local_tokenizer(path: str | os.PathLike[str] | None = None, texts=CALIB_TEXTS,
                         vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a few sentences (ids < vocab_size)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    if path is not None:
        fast.save_pretrained(path)
    return fast


# Appended by the integration tests: OPT (Linear-based, pre-LN, fc1/fc2) for block discovery.
FAMILIES["opt"] = dict(model_type="opt", ffn_dim=128, word_embed_proj_dim=64)
