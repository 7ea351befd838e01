"""SmolLM2-135M with every decoder block quantized: perplexity of WaterSIC, GPTQ and RTN.

This is the full-model counterpart of ``bench_models.py`` (which can restrict itself to the first
blocks to fit a CPU budget). Each run is a fresh ``from_pretrained(..., quantization_config=...)``
of the cached fp32 SmolLM2-135M folder; perplexity is measured on the 2010-2013 SOTU speeches
(first ``--eval-tokens`` tokens, 512-token non-overlapping windows,
:func:`watersic_hf.evaluation.perplexity`).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_full_model.py --bits 3 --nsamples 16 --seqlen 256 \
        --damp 0.1 --eval-tokens 1024 --methods watersic rtn

Writes the section ``bench_full_model`` of docs/benchmarks.md (``--no-report`` to skip).
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import machine_line, update_section
from transformers import AutoModelForCausalLM, AutoTokenizer

import watersic_hf
from watersic_hf.assets import smollm2_dir, sotu_eval_text
from watersic_hf.evaluation import perplexity


def _ppl(model, tok, eval_tokens: int) -> float:
    return perplexity(model, tok, sotu_eval_text(), seqlen=512, max_tokens=eval_tokens)["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--methods", nargs="+", default=["watersic", "gptq_entropy", "rtn"])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--damp", type=float, default=0.1, help="WaterSIC damping")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [("fp32", "–", f"{_ppl(fp, tok, args.eval_tokens):.3f}", "–")]
    del fp
    for method in args.methods:
        cfg = watersic_hf.WaterSICConfig(
            bits=args.bits,
            method=method,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            damp=args.damp if method == "watersic" else None,
        )
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=cfg, dtype=torch.float32
        )
        seconds = time.perf_counter() - start
        qc = model.config.quantization_config
        ppl = _ppl(model, tok, args.eval_tokens)
        rows.append((method, f"{qc.achieved_bits:.4f}", f"{ppl:.3f}", f"{seconds:.0f}"))
        print(f"{method}: bits {qc.achieved_bits:.4f} ppl {ppl:.3f} ({seconds:.0f} s)", flush=True)
        del model

    table = "\n".join(f"| {' | '.join(r)} |" for r in rows)
    md = f"""## bench_full_model: SmolLM2-135M, all 30 blocks quantized

{machine_line()}

Target {args.bits} bits per weight over all 210 block Linears (pooled-entropy accounting,
global rate control); calibration {args.nsamples} × {args.seqlen} tokens of the shipped
1934-1999 SOTU corpus; WaterSIC damp {args.damp}; perplexity on the first
{args.eval_tokens} tokens of the 2010-2013 SOTU speeches, 512-token windows. Quantize time is the
whole `from_pretrained` call on a 2-core CPU.

| method | achieved bits | perplexity | quantize time (s) |
|---|---|---|---|
{table}
"""
    print(md)
    if not args.no_report:
        update_section("bench_full_model", md)


if __name__ == "__main__":
    main()
