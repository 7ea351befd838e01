"""Peak RSS of quantizing a model larger than its memory budget (sequential onloading).

A synthetic Llama (random weights, saved as safetensors) is quantized with
``from_pretrained(..., device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=...)``; the
blocks that do not fit stay on disk and are read one at a time. Each run is a fresh process whose
VmHWM is reported next to the bound ``constant + 2 blocks + embeddings + quantized blocks +
calibration working set`` (the constant is the process's RSS after its imports, measured in the
same process; the quantized blocks are the output, kept in memory; the working set is the memory
model's peak of one block, :func:`watersic_hf.integration.engine.memory.block_peak`: activation
caches plus one group's fp64 statistics, zero for the data-free RTN). An in-memory run (no
device map) of the same model and method gives the peak without onloading.

Usage::

    python benchmarks/bench_onload.py --blocks 24 --hidden 1024 --intermediate 4096

Writes the section ``bench_onload`` of docs/benchmarks.md (``--no-report`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_model(path: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                      tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def worker(args: argparse.Namespace) -> None:
    """One quantization in this (fresh) process; prints a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    import watersic_hf

    torch.zeros(1).add_(1)  # touch the allocator before the baseline
    baseline = _status("VmRSS")
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, args.vocab, (args.seqlen,), generator=g)
           for _ in range(args.nsamples)]
    skip = [f"model.layers.{i}." for i in range(args.calibrate_blocks, args.blocks)]
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=ids, seqlen=args.seqlen,
                                     nsamples=args.nsamples, method=args.method, damp=0.05,
                                     modules_to_not_convert=skip or None)
    kwargs = {}
    if args.budget:
        kwargs = dict(device_map="auto", max_memory={"cpu": args.budget},
                      offload_folder=args.offload)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, quantization_config=cfg, **kwargs)
    wall = time.perf_counter() - t0
    dmap = getattr(model, "hf_device_map", {}) or {}
    quantized = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                    if ".layers." in n and t.device.type != "meta"
                    and not n.endswith("layernorm.weight"))

    def where(name: str) -> str:
        keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
        return str(dmap[max(keys, key=len)]) if keys else "cpu"

    places = [where(f"model.layers.{i}") for i in range(args.blocks)]
    print(json.dumps({
        "wall": wall, "peak_rss": _status("VmHWM"), "baseline_rss": baseline,
        "blocks_on_disk": places.count("disk"),
        "blocks_in_memory": len(places) - places.count("disk"),
        "embeddings": where("model.embed_tokens"),
        "quantized_layer_bytes": quantized,
    }))


def run(args: argparse.Namespace, path: str, method: str, budget: int | None,
        calibrate_blocks: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--path", path,
           "--method", method, "--calibrate-blocks", str(calibrate_blocks),
           "--offload", os.path.join(path, "offload")]
    for k in ("blocks", "hidden", "intermediate", "vocab", "nsamples", "seqlen"):
        cmd += [f"--{k}", str(getattr(args, k))]
    if budget:
        cmd += ["--budget", str(budget)]
    # glibc's mmap threshold pinned (as in bench_memory.py) so that freed tensors go back to the
    # system and RSS tracks live bytes.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    # cwd: not the repository root, whose kernels/ folder would shadow the name `kernels`
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--watersic-blocks", type=int, default=2,
                   help="blocks calibrated in the WaterSIC run (the others stay float, on disk)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--from-log", help="tabulate the printed lines of an earlier run instead")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--method", default="rtn", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offload", help=argparse.SUPPRESS)
    p.add_argument("--calibrate-blocks", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.make:
        make_model(args.path, args)
        return
    sys.path.insert(0, HERE)
    from _report import machine_line, update_section

    h, m, v = args.hidden, args.intermediate, args.vocab
    kv = max(1, h // 256) * 64
    block = 4 * (2 * h * h + 2 * h * kv + 3 * h * m)  # fp32 q, o, k, v, gate, up, down
    embeddings = 2 * 4 * v * h  # embed_tokens + lm_head, fp32
    model_bytes = args.blocks * block + embeddings
    # Budget: the embeddings and one block (accelerate also reserves room for its largest layer).
    budget = embeddings + block + block // 4
    tokens = args.nsamples * args.seqlen
    caches = 3 * tokens * h * 4  # both block-input caches and the next float cache, fp32
    from watersic_hf.integration.engine.memory import PER_LAYER_AN, block_peak, llama_groups

    working = block_peak(llama_groups(h, m, h // 64, max(1, h // 256)), h, tokens)["peak"]
    # RTN is data-free: its working set is the per-Linear arrays of the largest Linear only.
    working_rtn = 8 * PER_LAYER_AN * h * m
    rows = []
    if args.from_log:
        # Re-tabulate the JSON lines of an earlier run (printed as "METHOD WHERE {json} ...").
        with open(args.from_log) as f:
            text_in = f.read()
        load = [float(x) for x in re.findall(r"load average ([0-9.]+) at the start, ([0-9.]+)",
                                             text_in)[0]]
        for line in text_in.splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] in ("rtn", "watersic") and "{" in parts[2]:
                where = "in memory" if parts[1] == "in" else "offloaded"
                r = json.loads(parts[2][parts[2].index("{"):parts[2].rindex("}") + 1])
                ncal = args.blocks if parts[0] == "rtn" else args.watersic_blocks
                rows.append((parts[0], where, ncal, None, r))
    else:
        load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_onload-") as tmp:
        path = os.path.join(tmp, "model")
        cases = [("rtn", "offloaded", budget, args.blocks),
                 ("watersic", "offloaded", budget, args.watersic_blocks),
                 ("rtn", "in memory", None, args.blocks)]
        for method, where, b, ncal in ([] if args.from_log else cases):
            if not rows:
                subprocess.run([sys.executable, os.path.abspath(__file__), "--make", "--path",
                                path, *[a for k in ("blocks", "hidden", "intermediate", "vocab")
                                        for a in (f"--{k}", str(getattr(args, k)))]],
                               check=True, cwd=tmp, capture_output=True)
            r = run(args, path, method, b, ncal)
            rows.append((method, where, ncal, b, r))
            print(method, where, json.dumps(r), flush=True)
    if not args.from_log:
        load.append(os.getloadavg()[0])
    lines = [
        "## Sequential onloading: peak RSS of a model larger than its memory budget",
        "",
        machine_line(),
        f"Machine shared with other jobs: load average {load[0]:.2f} at the start, {load[1]:.2f} "
        f"at the end (2 cores); runs under `nice -n 19`, {args.threads} threads, "
        "`MALLOC_MMAP_THRESHOLD_=65536`.",
        "",
        f"Synthetic Llama: {args.blocks} blocks, hidden {h}, intermediate {m}, vocab {v}, random "
        f"fp32 weights in safetensors: {_mb(model_bytes)} MiB ({_mb(block)} MiB per block, "
        f"{_mb(embeddings)} MiB embeddings + lm_head). Budget `max_memory={{'cpu': "
        f"{_mb(budget)} MiB}}` (embeddings + 1.25 blocks); calibration {args.nsamples} × "
        f"{args.seqlen} tokens (activation caches {_mb(caches)} MiB). Each run is a fresh "
        "process (`python benchmarks/bench_onload.py`). *constant* = its RSS after imports; "
        "*2B+E+C* = 2 float blocks + embeddings + activation caches (the target bound without "
        "the constant); *quantized* = the WaterSICLinear tensors the run ends with; *working* = "
        "the memory model's working set (engine/memory.py): for WaterSIC one block's "
        f"calibration peak, i.e. caches plus the fp64 statistics and per-Linear arrays of the "
        f"down_proj group ({_mb(working)} MiB), for the data-free RTN the per-Linear arrays of "
        f"the largest Linear ({_mb(working_rtn)} MiB). *bound* = constant + 2B+E+C + quantized "
        "+ working.",
        "",
        "| method | weights | blocks quantized | blocks on disk / in memory | wall s "
        "| constant MiB | 2B+E+C MiB | quantized MiB | working MiB | bound MiB "
        "| **peak RSS MiB** |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, where, ncal, _budget, r in rows:
        target = 2 * block + embeddings + (caches if method != "rtn" else 0)
        work = working if method != "rtn" else working_rtn
        bound = r["baseline_rss"] + target + r["quantized_layer_bytes"] + work
        offl = where == "offloaded"
        lines.append(
            f"| {method} | {where} | {ncal} | {r['blocks_on_disk']} / {r['blocks_in_memory']} | "
            f"{r['wall']:.0f} | {_mb(r['baseline_rss'])} | {_mb(target) if offl else '–'} | "
            f"{_mb(r['quantized_layer_bytes'])} | {_mb(work) if offl else '–'} | "
            f"{_mb(bound) if offl else '–'} | **{_mb(r['peak_rss'])}** |")
    ws = next((r for method, _w, _n, _b, r in rows if method == "watersic"), None)
    per_block = f" ({ws['wall'] / args.watersic_blocks:.0f} s per block here)" if ws else ""
    lines += ["", f"The WaterSIC run calibrates the first {args.watersic_blocks} blocks (the "
              "others are kept in float by `modules_to_not_convert` and never read) to keep the "
              f"benchmark short{per_block}; its working set is per block (the memory model), "
              f"and the {args.blocks}-block RTN run shows that onloaded blocks do not "
              "accumulate. The codes of an onloaded calibration equal the in-memory ones "
              "(tests/test_scale.py)."]
    text = "\n".join(lines)
    print(text)
    if not args.no_report:
        update_section("bench_onload", text)


if __name__ == "__main__":
    main()
