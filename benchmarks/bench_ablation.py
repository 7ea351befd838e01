"""Which parts of the recipe earn their place: SmolLM2-135M perplexity with each part switched.

Starting from the full recipe (automatic damping, drift correction, residual compensation,
attention weighting, rescalers, global rate control, and the fixed (eps_q, eps_a) mix: every
variant pins ``adaptive_eps=False`` unless it sets it, so the baseline does not change with the
rate although the default searches below 2.5 bits), each variant changes one setting;
"plain loop" switches off drift, residual compensation, attention weighting and rate control
together (a plain sequential loop over the single-layer quantizer). Every variant is
quantized through ``from_pretrained`` in a fresh subprocess, calibrated on the shipped pre-2000
State-of-the-Union corpus and evaluated on the 2010-2013 speeches (:mod:`watersic_hf.evaluation`:
first 4096 tokens, 512-token windows). Results are cached as JSON under
``benchmarks/results/ablation/``, kept in git (delete a file to re-measure it), and the table
goes into the ``ablation`` section of docs/benchmarks.md (``--section`` to write another one,
e.g. for another token count).

Usage::

    python benchmarks/bench_ablation.py                                  # 3 bits, 64 x 512
    python benchmarks/bench_ablation.py --variants full fixed_damp_1e-4 --nsamples 8 --seqlen 256 \
        --section ablation_8x256
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ablation"  # kept in git: a later run adds rows
EVAL_TOKENS, EVAL_SEQLEN = 4096, 512

#: variant -> (description, WaterSICConfig overrides of the defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full recipe, fixed (eps_q, eps_a) mix", {}),
    "no_drift": ("drift correction off", {"drift": False}),
    "no_residual": ("residual compensation off", {"residual_compensation": False}),
    "no_attention": ("attention weighting off", {"attention_weighted": False}),
    "no_rescale": ("rescalers off", {"rescale": False}),
    "no_rate_control": ("rate control off", {"rate_control": False}),
    "adaptive_eps": ("adaptive (eps_q, eps_a) on", {"adaptive_eps": True}),
    "finetune": ("WaterSIC-FT on", {"finetune": True}),
    "fixed_damp_1e-4": ("fixed damp 1e-4 (the default before automatic damping)",
                        {"damp": 1e-4}),
    "fixed_damp_0.1": ("fixed damp 0.1", {"damp": 0.1}),
    # the same two recipes on another set of calibration windows: how far a difference between
    # rows can come from the choice of windows alone
    "seed_1": ("full recipe, other calibration windows (seed 1)", {"seed": 1}),
    "no_rescale_seed_1": ("rescalers off, other calibration windows (seed 1)",
                          {"rescale": False, "seed": 1}),
    "plain": ("plain loop: drift, residual, attention weighting and rate control off",
              {"drift": False, "residual_compensation": False, "attention_weighted": False,
               "rate_control": False}),
}
DEFAULT_VARIANTS = ["full", "no_drift", "no_residual", "no_attention", "no_rescale",
                    "no_rate_control", "adaptive_eps", "finetune", "fixed_damp_1e-4", "plain"]


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def run_one(variant: str, bits: float, nsamples: int, seqlen: int, out: pathlib.Path) -> None:
    """Quantize one variant (or load fp32 for ``variant == "fp32"``), evaluate, write JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import watersic_hf
    from watersic_hf.assets import smollm2_dir, sotu_eval_text
    from watersic_hf.evaluation import perplexity

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if variant == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        overrides = {"adaptive_eps": False, **VARIANTS[variant][1]}
        cfg = watersic_hf.WaterSICConfig(bits=bits, nsamples=nsamples, seqlen=seqlen,
                                         **overrides)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                     dtype=torch.float32)
        qc = model.config.quantization_config
        held = [m["heldout_rel_err"] for m in qc.layers.values() if "heldout_rel_err" in m]
        damps = sorted(m["damp"] for m in qc.layers.values() if m.get("damp") is not None)
        extra = {
            "achieved_bits": qc.achieved_bits,
            "rel_err_mean": sum(m["rel_err"] for m in qc.layers.values()) / len(qc.layers),
            "heldout_rel_err_mean": sum(held) / len(held) if held else None,
            "damp_median": damps[len(damps) // 2] if damps else None,
        }
    seconds = time.perf_counter() - start
    if variant != "fp32":  # the same size measures as bench_rate_ppl_plot.py
        from bench_rate_ppl_plot import size_bits

        extra["bits_in_memory"], extra["bits_on_disk"] = size_bits(model)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    ppl = perplexity(model, tok, sotu_eval_text(), seqlen=EVAL_SEQLEN, max_tokens=EVAL_TOKENS)
    _write_json(out, {"variant": variant, "bits": bits, "nsamples": nsamples, "seqlen": seqlen,
                      "ppl": ppl["ppl"], "seconds": seconds, "peak_rss_mib": rss,
                      "threads": torch.get_num_threads(), **extra})


#: Variants that are points of ``bench_rate_ppl_plot.py`` (same defaults, model, calibration and
#: evaluation): variant -> its method there.
_FROM_RATE_PPL = {"full": "watersic", "finetune": "watersic_ft"}


def _from_rate_ppl(variant: str, args: argparse.Namespace, out: pathlib.Path) -> None:
    """Reuse ``bench_rate_ppl_plot.py``'s point for ``variant`` at the same bits and token count
    rather than quantize again (the full recipe, and WaterSIC-FT on its checkpoint)."""
    path = ROOT / "benchmarks" / "results" / "rate_ppl.json"
    if not path.exists():
        return
    for p in json.loads(path.read_text(encoding="utf-8"))["points"]:
        if (p["method"], float(p["bits_target"]), p["nsamples"], p["seqlen"]) == (
                _FROM_RATE_PPL[variant], args.bits, args.nsamples, args.seqlen):
            _write_json(out, {
                "variant": variant, "bits": args.bits, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "ppl": p["ppl"], "seconds": p["quantize_seconds"],
                "achieved_bits": p["achieved_bits"], "rel_err_mean": p.get("rel_err_mean"),
                "heldout_rel_err_mean": p.get("heldout_rel_err_mean"),
                "damp_median": p.get("damp_median"), "bits_in_memory": p["bits_in_memory"],
                "bits_on_disk": p["bits_on_disk"], "source": "bench_rate_ppl_plot.py",
            })
            return


def _table(results: dict[str, dict], bits: float, nsamples: int, seqlen: int) -> str:
    from _report import machine_line

    fp = results["fp32"]["ppl"]
    lines = [
        machine_line(),
        "",
        f"SmolLM2-135M at **{bits:g} bits**, calibrated on **{nsamples} × {seqlen} tokens** of the "
        "shipped 1934-1999 SOTU corpus; perplexity on the 2010-2013 speeches (first "
        f"{EVAL_TOKENS} tokens, {EVAL_SEQLEN}-token windows). fp32 perplexity **{fp:.3f}**. Each "
        "row changes one setting of the full recipe (`benchmarks/bench_ablation.py`); time is "
        "`from_pretrained` with calibration in a fresh process ("
        + "/".join(str(t) for t in sorted({r.get("threads", "?") for r in results.values()
                                             if "threads" in r}))
        + " thread(s) per run; two runs shared the machine).",
        "",
        "| variant | ppl | × fp32 | achieved bits | bits in memory / on disk | mean rel. err "
        "(in-sample / held-out) | median damp | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "fp32":
            continue
        rel = r.get("rel_err_mean")
        held = r.get("heldout_rel_err_mean")
        damp = r.get("damp_median")
        mem, disk = r.get("bits_in_memory"), r.get("bits_on_disk")
        size = "not measured" if mem is None else f"{mem:.3f} / {disk:.3f}"
        lines.append(
            f"| {VARIANTS[name][0]} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} | "
            f"{r['achieved_bits']:.3f} | {size} | {'–' if rel is None else f'{rel:.4f}'} / "
            f"{'–' if held is None else f'{held:.4f}'} | "
            f"{'–' if damp is None else f'{damp:.3g}'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--section", default="ablation", help="docs/benchmarks.md section to write")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="write the table from the cached results; skip variants not measured")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_one(args.child[0], args.bits, args.nsamples, args.seqlen, pathlib.Path(args.child[1]))
        return
    results: dict[str, dict] = {}
    for variant in ["fp32", *args.variants]:
        tag = ("fp32" if variant == "fp32"
               else f"{variant}_b{args.bits:g}_{args.nsamples}x{args.seqlen}")
        out = OUT / f"{tag}.json"
        if variant in _FROM_RATE_PPL and not out.exists():
            _from_rate_ppl(variant, args, out)
        if not out.exists() and args.report_only:
            print(f"[bench_ablation] {variant}: not measured, left out", flush=True)
            continue
        if not out.exists():
            print(f"[bench_ablation] {variant} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--bits", str(args.bits), "--nsamples",
                            str(args.nsamples), "--seqlen", str(args.seqlen), "--child", variant,
                            str(out)], check=True)
        results[variant] = json.loads(out.read_text(encoding="utf-8"))
        r = results[variant]
        print(f"[bench_ablation] {variant}: ppl {r['ppl']:.3f} ({r['seconds']:.0f} s)", flush=True)
    table = _table(results, args.bits, args.nsamples, args.seqlen)
    print(table)
    if not args.no_report:
        from _report import update_section

        update_section(args.section, table)


if __name__ == "__main__":
    main()
