"""WaterSIC-FT on SmolLM2-135M: perplexity and KL before and after fine-tuning the scales.

For each ``--bits``: a WaterSIC checkpoint of SmolLM2-135M (read from ``--checkpoint-dir/w{bits}``
when it is there, else quantized with ``--nsamples`` × ``--seqlen`` tokens of the shipped
1934-1999 SOTU corpus and saved there when ``--checkpoint-dir`` is given) is fine-tuned with
:func:`watersic_hf.finetune_scales` against the float model on the calibration windows (the same
windows calibration used: same corpus, seed, count and length). Reported: perplexity on the
2010-2013 SOTU speeches (:func:`watersic_hf.evaluation.perplexity`: first ``--eval-tokens`` tokens,
512-token windows) and the token KL(float ‖ quantized) on those eval windows, before and after;
the training KL on the calibration windows; steps and time.

Usage::

    nice -n 19 python benchmarks/bench_finetune.py --bits 3 --nsamples 8 --seqlen 256 \
        --damp 0.1 --steps 16 --batch-size 2
    python benchmarks/bench_finetune.py --bits 2 2.5 3 --nsamples 64 --seqlen 512 \
        --checkpoint-dir ckpt/smollm2

Writes the section ``finetune`` of docs/benchmarks.md (``--no-report`` to skip).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time

import torch
from _report import machine_line, update_section
from transformers import AutoModelForCausalLM, AutoTokenizer

import watersic_hf
from watersic_hf.assets import smollm2_dir, sotu_eval_text
from watersic_hf.evaluation import kl_divergence, perplexity
from watersic_hf.integration.data import calibration_windows
from watersic_hf.integration.finetune import (
    FinetuneSettings,
    default_finetune_steps,
    lm_head_inputs,
)


def _quantized(path: pathlib.Path, args: argparse.Namespace, bits: float,
               ckpt: pathlib.Path | None) -> tuple[torch.nn.Module, float | None, str]:
    """The quantized model: loaded from ``ckpt`` when saved there, else calibrated (and saved)."""
    if ckpt is not None and (ckpt / "config.json").exists():
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        if (qc["nsamples"], qc["seqlen"]) != (args.nsamples, args.seqlen):
            raise SystemExit(f"{ckpt} was calibrated on {qc['nsamples']}x{qc['seqlen']} tokens, "
                             f"not {args.nsamples}x{args.seqlen}: pass those or another folder")
        return AutoModelForCausalLM.from_pretrained(ckpt), None, f"loaded {ckpt}"
    cfg = watersic_hf.WaterSICConfig(bits=bits, nsamples=args.nsamples, seqlen=args.seqlen,
                                     damp=args.damp, seed=args.seed)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                 dtype=torch.float32)
    seconds = time.perf_counter() - start
    if ckpt is not None:
        model.save_pretrained(ckpt)
    return model, seconds, "calibrated"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=float, nargs="+", default=[3.0])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--damp", type=float, default=None, help="WaterSIC damping (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: 10 epochs on CUDA, 2 on the CPU)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                   help="reuse (or save) the quantized checkpoints in DIR/w{bits}")
    p.add_argument("--device", default=None, help="fine-tuning device (default: cuda if any)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("watersic_hf.integration.finetune").setLevel(logging.INFO)

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    text = sotu_eval_text()
    ppl_fp = perplexity(teacher, tok, text, seqlen=512, max_tokens=args.eval_tokens)["ppl"]
    windows = calibration_windows(None, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                  seed=args.seed)
    with torch.no_grad():  # the teacher's lm_head inputs, once for every bit width
        hidden = [lm_head_inputs(teacher, w[None].to(device))[0].cpu() for w in windows]
    batch = min(args.batch_size, len(windows))
    steps = args.steps or default_finetune_steps(len(windows), batch, device)
    rows = []
    for bits in args.bits:
        ckpt = args.checkpoint_dir / f"w{bits:g}" if args.checkpoint_dir else None
        model, calib_s, origin = _quantized(path, args, bits, ckpt)
        model.eval().to(device)
        achieved = model.config.quantization_config.achieved_bits
        ev = dict(seqlen=512, max_tokens=args.eval_tokens)
        ppl0 = perplexity(model, tok, text, **ev)["ppl"]
        kl0 = kl_divergence(model, teacher, tok, text, **ev)["kl_nats"]
        report = watersic_hf.finetune_scales(
            model, windows, hidden,
            FinetuneSettings(steps=steps, lr=args.lr, batch_size=batch, seed=args.seed))
        ppl1 = perplexity(model, tok, text, **ev)["ppl"]
        kl1 = kl_divergence(model, teacher, tok, text, **ev)["kl_nats"]
        rows.append(dict(bits=bits, achieved=achieved, origin=origin, calib_s=calib_s,
                         ppl0=ppl0, ppl1=ppl1, kl0=kl0, kl1=kl1, report=report.to_dict()))
        print(json.dumps(rows[-1]), flush=True)
        print("losses:", [round(x, 5) for x in report.losses], flush=True)
        del model

    table = "\n".join(
        f"| {r['bits']:g} | {r['achieved']:.4f} | {r['ppl0']:.3f} | **{r['ppl1']:.3f}** | "
        f"{r['kl0']:.4f} → {r['kl1']:.4f} | {r['report']['kl_before']:.4f} → "
        f"{r['report']['kl_after']:.4f} | {r['report']['steps']} | {r['report']['epochs']:g} | "
        f"{r['report']['seconds']:.0f} | "
        f"{'–' if r['calib_s'] is None else format(r['calib_s'], '.0f')} |"
        for r in rows
    )
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    md = f"""## finetune: WaterSIC-FT on SmolLM2-135M (scales fine-tuned, codes fixed)

{machine_line()}

WaterSIC checkpoints of SmolLM2-135M (all 30 blocks; calibration {args.nsamples} × {args.seqlen}
tokens of the shipped 1934-1999 SOTU corpus, damp {args.damp or 'default (1e-4)'}), then
WaterSIC-FT (algorithm.md §3.10) on the same calibration windows: fp16 row/column scales
trained against the float model's next-token distributions, AdamW lr {args.lr:g} cosine-decayed
to lr/100, batch {batch} windows, gradient clip 1.0; the integer codes and the rate do not
change. Perplexity and eval KL(float ‖ quantized, nats/token) on the first {args.eval_tokens}
tokens of the 2010-2013 SOTU speeches, 512-token windows; train KL on the calibration windows.
Float perplexity **{ppl_fp:.3f}**. Device {device}, {threads} threads; FT time includes the two
train-KL evaluations.

| bits | achieved | ppl before | ppl after FT | eval KL | train KL | steps | epochs | FT (s) \
| calibration (s) |
|---|---|---|---|---|---|---|---|---|---|
{table}
"""
    print(md)
    if not args.no_report:
        update_section("finetune", md)


if __name__ == "__main__":
    main()
