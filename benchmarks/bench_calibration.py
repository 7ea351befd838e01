"""Whole-model calibration time of SmolLM2-135M against one float forward over the same tokens.

Issue 11's yardstick: quantize SmolLM2-135M (all 30 blocks, default WaterSIC settings: drift,
residual compensation and attention weighting on) with ``nsamples × seqlen`` calibration tokens,
and in the same process time one float forward of the whole model over those tokens. The ratio
of the two is what the calibration engine costs in units of "one forward over the data"; it is
robust to the load of a shared machine because both are measured back to back.

The script also counts how many times each decoder block is called during calibration (a
forward pre-hook on every block, so early-stopped partial passes count too), i.e. the number of
block forward passes per block.

Usage::

    python benchmarks/bench_calibration.py --nsamples 32 --seqlen 512
    python benchmarks/bench_calibration.py --nsamples 32 --seqlen 512 --json out.json --no-report

Writes the section ``bench_calibration`` of docs/benchmarks.md (``--no-report`` to skip);
``--baseline`` adds the rows of earlier ``--json`` outputs (e.g. of the engine before issue 11)
to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _report import machine_line, update_section
from transformers import AutoModelForCausalLM, AutoTokenizer

import watersic_hf
from watersic_hf.assets import smollm2_dir
from watersic_hf.integration.blocks import find_decoder_blocks
from watersic_hf.integration.calibrate import calibrate_model
from watersic_hf.integration.data import calibration_windows, make_batches


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure(nsamples: int, seqlen: int, label: str, blocks: int | None = None) -> dict[str, object]:
    """Time one float forward and one calibration (all blocks, or the first ``blocks``)."""
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = watersic_hf.WaterSICConfig(bits=3, nsamples=nsamples, seqlen=seqlen, tokenizer=tok)
    windows = calibration_windows(cfg.dataset, tok, nsamples=nsamples, seqlen=seqlen,
                                  seed=cfg.seed, model=model,
                                  vocab_size=model.config.vocab_size)
    batches = make_batches(windows, cfg.batch_size)
    load_before = _load_average()
    _, layers = find_decoder_blocks(model)
    k = len(layers) if blocks is None else blocks
    # Time spent inside the first k blocks during the float forward (pre/post hooks).
    marks: list[float] = []
    timers = [layers[0].register_forward_pre_hook(lambda *_: marks.append(time.perf_counter())),
              layers[k - 1].register_forward_hook(lambda *_: marks.append(time.perf_counter()))]
    with torch.no_grad():
        model(batches[0][:, :8])  # warm-up (allocator, kernels' first call)
        marks.clear()
        start = time.perf_counter()
        for b in batches:
            model(b)
        forward_s = time.perf_counter() - start
    for h in timers:
        h.remove()
    blocks_forward_s = sum(marks[i + 1] - marks[i] for i in range(0, len(marks), 2))
    skip = ["lm_head"] + [f"model.layers.{i}" for i in range(k, len(layers))]
    blocks = layers
    calls = [0] * len(blocks)

    def counter(idx: int):
        def hook(_m, _a):
            calls[idx] += 1

        return hook

    handles = [b.register_forward_pre_hook(counter(i)) for i, b in enumerate(blocks)]
    start = time.perf_counter()
    res = calibrate_model(model, cfg, modules_to_not_convert=skip)
    calib_s = time.perf_counter() - start
    for h in handles:
        h.remove()
    return {
        "label": label,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "batches": len(batches),
        "blocks": k,
        "forward_s": forward_s,
        "blocks_forward_s": blocks_forward_s,
        "calibrate_s": calib_s,
        "ratio": calib_s / forward_s,
        "block_ratio": calib_s / blocks_forward_s,
        "block_calls": calls[:k],
        "achieved_bits": res.achieved_bits,
        "load": f"{load_before} → {_load_average()}",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, nargs="+", default=[32])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--label", default="this engine")
    p.add_argument("--blocks", type=int, help="quantize only the first BLOCKS blocks")
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.add_argument("--baseline", nargs="*", default=[], help="JSON-lines files of earlier runs")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()

    rows = []
    for path in args.baseline:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    for n in args.nsamples:
        r = measure(n, args.seqlen, args.label, args.blocks)
        print(json.dumps(r), flush=True)
        rows.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    table = "\n".join(
        f"| {r['label']} | {r['nsamples']}×{r['seqlen']} | {r['blocks']} | {r['batches']} | "
        f"{', '.join(str(c) for c in r['block_calls'])} | {r['forward_s']:.1f} | "
        f"{r['blocks_forward_s']:.1f} | {r['calibrate_s']:.0f} | **{r['ratio']:.1f}** | "
        f"{r['block_ratio']:.1f} | {r['load']} |"
        for r in rows
    )
    header = ("| engine | tokens | blocks | B | block calls | forward (s) | fwd blocks (s) | "
              "calibration (s) | ratio | block ratio | load |")
    md = f"""## bench_calibration: SmolLM2-135M calibration time vs one float forward

{machine_line()}

Whole-model WaterSIC calibration (3 bits, all 30 blocks, default settings: drift, residual
compensation and attention weighting on, batch size 1) against one float forward of the whole
model over the same calibration windows, timed back to back in one process with
{rows[-1]['threads']} threads. *blocks*: blocks quantized (the first ones; 30 = whole model).
*block calls*: calls of each quantized decoder block during calibration, in block order (a
pre-hook, so early-stopped passes count; block 0's count includes the B identity calls that
capture the block inputs), B = batches. *forward*: the whole float forward; *fwd blocks*: the
part of it spent in the quantized blocks. *ratio* = calibration / forward (the issue's measure,
meaningful only when blocks = 30); *block ratio* = calibration / fwd blocks (comparable between
partial runs). *load*: 1/5/15-minute
load average before and after the run (the machine is shared with other jobs).

{header}
|---|---|---|---|---|---|---|---|---|---|---|
{table}
"""
    print(md)
    if not args.no_report:
        update_section("bench_calibration", md)


if __name__ == "__main__":
    main()
