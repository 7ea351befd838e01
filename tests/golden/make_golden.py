"""Rebuild the golden entropy-storage checkpoint ``tests/golden/tiny_entropy_v1/``.

Run once (``python tests/golden/make_golden.py``) and commit the output; the test
``tests/test_storage_checkpoint.py::test_golden_checkpoint_loads_to_stored_logits`` then pins the
on-disk format: a later change that cannot read this folder, or reads it to other logits, fails.
Only rerun it for a deliberate format change (with a new folder name and FORMAT_VERSION).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

OUT = os.path.join(HERE, "tiny_entropy_v1")
VOCAB = 64
INPUT_IDS = [[1, 5, 9, 2, 33, 60, 7, 7, 12, 40, 3, 0]]


def main() -> None:
    """Quantize a seeded 1-block Llama (hidden 32, vocab 64) at 3 bits and save it."""
    from _tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    from watersic_hf import WaterSICConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as src:
        make_tiny_model("llama", src, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB)
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(4)]
        cfg = WaterSICConfig(bits=3, dataset=ids, nsamples=4, seqlen=16, storage="entropy")
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    model.save_pretrained(OUT)
    with torch.no_grad():
        logits = model(torch.tensor(INPUT_IDS)).logits
    with open(os.path.join(OUT, "expected_logits.json"), "w") as f:
        json.dump({"input_ids": INPUT_IDS, "logits": logits.tolist()}, f)


if __name__ == "__main__":
    main()
