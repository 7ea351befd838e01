"""One process against two (torch.distributed, gloo, CPU): calibration time and identical codes.

A seeded random Llama is calibrated by ``calibrate_model`` once in a single process and once under
``torchrun --standalone --nproc-per-node 2``, every process with one thread; the SHA-256 of every
layer's codes and scales must be equal. Times are rank 0's ``calibrate_model`` wall time and the
wall time of the whole command (interpreter start, imports and process-group setup included).

Usage::

    python benchmarks/bench_distributed.py --blocks 4 --hidden 512 --intermediate 1536

Writes the section ``bench_distributed`` of docs/benchmarks.md (``--no-report`` to skip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args: argparse.Namespace) -> None:
    """Calibrate in this process (one rank of a torchrun job or alone); rank 0 writes JSON."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    import watersic_hf
    from watersic_hf.integration.calibrate import calibrate_model
    from watersic_hf.integration.engine.distributed import init_from_environment
    from watersic_hf.nn import WaterSICLinear

    torch.set_num_threads(1)
    comm = init_from_environment()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, args.vocab, (args.seqlen,), generator=g)
           for _ in range(args.nsamples)]
    qcfg = watersic_hf.WaterSICConfig(bits=3, dataset=ids, seqlen=args.seqlen,
                                      nsamples=args.nsamples, damp=0.05,
                                      rate_control=not args.no_rate_control)
    seen: list[str] = []
    real = WaterSICLinear.from_quantized.__func__

    def spy(klass, qw, bias, **kw):
        h = hashlib.sha256()
        for t in (qw.codes, qw.col_scale, qw.row_scale):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        seen.append(h.hexdigest())
        return real(klass, qw, bias, **kw)

    WaterSICLinear.from_quantized = classmethod(spy)
    t0 = time.perf_counter()
    res = calibrate_model(model, qcfg, modules_to_not_convert=["lm_head"])
    seconds = time.perf_counter() - t0
    if comm is None or comm.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"seconds": seconds, "layers": dict(zip(res.modules, seen, strict=True)),
                       "achieved_bits": res.achieved_bits,
                       "world": 1 if comm is None else comm.world}, f)
    if comm is not None:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--no-rate-control", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, HERE)
    from _report import machine_line, update_section

    sizes = [a for k in ("blocks", "hidden", "intermediate", "vocab", "nsamples", "seqlen")
             for a in (f"--{k}", str(getattr(args, k)))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    load = [os.getloadavg()[0]]
    results: dict[tuple[bool, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as tmp:
        for rate_control in (True, False):
            for world in (1, 2):
                out = os.path.join(tmp, f"w{world}-{rate_control}.json")
                launcher = ([sys.executable] if world == 1 else
                            [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", str(world)])
                flags = [] if rate_control else ["--no-rate-control"]
                t0 = time.perf_counter()
                # cwd: not the repository root, whose kernels/ folder would shadow `kernels`
                proc = subprocess.run([*launcher, os.path.abspath(__file__), "--worker", "--out",
                                       out, *sizes, *flags], env=env, cwd=tmp,
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                with open(out) as f:
                    results[rate_control, world] = json.load(f) | {"wall": wall}
                print(rate_control, world, results[rate_control, world]["seconds"], wall,
                      flush=True)
    load.append(os.getloadavg()[0])
    same = all(results[rc, 1]["layers"] == results[rc, 2]["layers"] for rc in (True, False))
    n_layers = len(results[True, 1]["layers"])
    lines = [
        "## Distributed calibration: one process against two (gloo, CPU)",
        "",
        machine_line(),
        f"Machine shared with other jobs: load average {load[0]:.2f} at the start, {load[1]:.2f} "
        "at the end (2 cores); run under `nice -n 19`, one thread per process.",
        "",
        f"Random Llama, {args.blocks} blocks, hidden {args.hidden}, intermediate "
        f"{args.intermediate}; WaterSIC 3 bits, {args.nsamples} × {args.seqlen} calibration "
        f"tokens (batch 1: {args.nsamples} batches, {args.nsamples // 2} per rank with two "
        "processes). `python benchmarks/bench_distributed.py`.",
        "",
        "| rate control | processes | calibrate_model s (rank 0) | command wall s "
        "| achieved bits | codes = 1 process |",
        "|---|---|---|---|---|---|",
    ]
    for (rc, world), r in results.items():
        eq = "–" if world == 1 else ("yes" if r["layers"] == results[rc, 1]["layers"] else "NO")
        lines.append(f"| {'on' if rc else 'off'} | {world} | {r['seconds']:.1f} | "
                     f"{r['wall']:.1f} | {r['achieved_bits']:.6f} | {eq} |")
    speed = {rc: results[rc, 1]["seconds"] / results[rc, 2]["seconds"] for rc in (True, False)}
    lines += ["", f"Codes and scales of all {n_layers} layers identical to one process "
              f"(SHA-256): **{'yes' if same else 'NO'}**. calibrate_model speed-up with two "
              f"processes: {speed[True]:.2f}× with rate control, {speed[False]:.2f}× without. "
              "The forward passes run in parallel; the statistics GEMMs run rank after rank (the "
              "chain that keeps Σ bit-identical); with rate control each Linear's target depends "
              "on the previous Linear's rate, so the Linears of a group are solved one after the "
              "other (each on its owner rank), without it at the same time. With other jobs on "
              "the two cores, two processes do not get twice the CPU of one."]
    text = "\n".join(lines)
    print(text)
    if not args.no_report:
        update_section("bench_distributed", text)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
