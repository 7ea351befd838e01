"""Rebuild ``tests/golden/calib_codes_v1.json``: fingerprints of the codes calibration produces.

Each entry quantizes a seeded tiny model (tests/_tiny.py) with one calibration setting and records,
per quantized Linear, the SHA-256 of its int32 codes and of its float32 row/column scales. The test
``tests/test_engine.py::test_codes_match_reference`` recomputes them: a change to the calibration
engine that alters any code, for any setting, fails it.

The file was produced from commit aa2255d (the engine before issue 11); ``llama_adaptive`` was
re-pinned in issue 12, when the adaptive-eps search moved to held-out batches and trials without
rescalers (a deliberate change of its results). Rerun this only for a
deliberate change of the quantization results, and say so in the commit message::

    python tests/golden/make_calib_codes.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
OUT = os.path.join(HERE, "calib_codes_v1.json")

#: name -> (family, WaterSICConfig keyword arguments besides bits/dataset/seqlen).
CASES: dict[str, tuple[str, dict]] = {
    "llama_default": ("llama", {}),
    "llama_batch2": ("llama", {"batch_size": 2}),
    "llama_plain": ("llama", {"drift": False, "residual_compensation": False,
                              "attention_weighted": False}),
    "llama_drift_only": ("llama", {"residual_compensation": False, "attention_weighted": False}),
    "llama_no_drift": ("llama", {"drift": False}),
    "llama_adaptive": ("llama", {"adaptive_eps": True, "adaptive_eps_steps": 1}),
    "llama_gptq": ("llama", {"method": "gptq_entropy"}),
    "llama_rtn": ("llama", {"method": "rtn"}),
    "gemma2_default": ("gemma2", {}),
    "qwen3_default": ("qwen3", {}),
}
NSAMPLES, SEQLEN, VOCAB = 4, 16, 128


def calibration_ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return [torch.randint(0, VOCAB, (SEQLEN,), generator=g) for _ in range(NSAMPLES)]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def fingerprint(case: str) -> dict[str, object]:
    """Quantize the tiny model of ``case`` and return its per-layer fingerprints."""
    from _tiny import make_tiny_model

    import watersic_hf
    from watersic_hf.integration import calibrate as calib
    from watersic_hf.nn import WaterSICLinear

    family, extra = CASES[case]
    if extra.get("method", "watersic") == "watersic":
        # The fingerprints pin the fixed-damping engine (damp 1e-4, the default before automatic
        # damping); automatic damping has tests of its own (tests/test_damping.py).
        extra = {"damp": 1e-4, **extra}
    model = make_tiny_model(family)
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=calibration_ids(), seqlen=SEQLEN,
                                     nsamples=NSAMPLES, **extra)
    seen: list[dict[str, str]] = []
    real = WaterSICLinear.from_quantized.__func__

    def spy(cls, qw, bias, **kw):
        seen.append({"codes": _sha(qw.codes.to(torch.int32)),
                     "col_scale": _sha(qw.col_scale.to(torch.float32)),
                     "row_scale": _sha(qw.row_scale.to(torch.float32))})
        return real(cls, qw, bias, **kw)

    WaterSICLinear.from_quantized = classmethod(spy)
    try:
        res = calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    finally:
        WaterSICLinear.from_quantized = classmethod(real)
    names = list(res.modules)
    return {"layers": dict(zip(names, seen, strict=True)),
            "achieved_bits": round(res.achieved_bits, 9)}


def main() -> None:
    torch.set_num_threads(1)
    data = {case: fingerprint(case) for case in CASES}
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, OUT)


if __name__ == "__main__":
    main()
