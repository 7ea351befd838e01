"""CPU inference speed: quantized SmolLM2-135M against its float32 and bfloat16 models.

Writes the section ``bench_cpu_inference`` of docs/benchmarks.md (``--no-report`` to skip):

1. **SmolLM2-135M** (the embedded model, ``watersic_hf.assets.smollm2_dir``) quantized at 2, 3
   and 4 bits, next to the same model in float32 and bfloat16, all in one process, at 1 and 2
   threads (``torch.set_num_threads``). *Decode*: greedy decoding with a KV cache, one token per
   forward, after an 8-token prompt (tokens per second of the decode steps alone). *Prefill*:
   one forward of 512 tokens. Each measurement is repeated ``--reps`` times, models
   interleaved, and the best is kept: on a shared machine the other jobs only ever slow a run
   down. Ratios are to float32 at the same thread count.
   The quantized models use RTN codes (``WaterSICConfig(method="rtn")``: data-free, quick to
   make), cached under ``$WATERSIC_CACHE/bench_cpu_inference``. WaterSIC's own codes have the
   same format and a similar share of escapes (about 10%, docs/benchmarks.md ``bench_kernels``).
2. **One 4096×14336 layer** (Llama-3-8B ``down_proj`` shape, synthetic WaterSIC-like codes at
   3 bits from ``bench_kernels.synthetic_codes``): decode (M = 1) and prefill (M = 512) against
   ``F.linear`` with fp32 and bf16 weights.

Run: ``python benchmarks/bench_cpu_inference.py`` (needs ``pip install -e .`` and the offline
model, see README; the first run quantizes the three models, about 2 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine_line, update_section  # noqa: E402

BITS = (2.0, 3.0, 4.0)
THREADS = (1, 2)
PROMPT_TOKENS = 8


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


# ---------------------------------------------------------------------------- models
def quantized_dir(path, bits: float):
    """A packed-storage RTN checkpoint of the model at ``bits``, made once and cached."""
    from transformers import AutoModelForCausalLM

    import watersic_hf
    from watersic_hf.assets import cache_dir

    out = cache_dir() / "bench_cpu_inference" / f"rtn-{bits:g}bit"
    if not (out / "config.json").exists():
        print(f"quantizing to {bits:g} bits (RTN, once) ...", flush=True)
        cfg = watersic_hf.WaterSICConfig(bits=bits, method="rtn", storage="packed")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                     dtype=torch.float32)
        model.save_pretrained(out)
        del model
    return out


def load_models(path) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    import watersic_hf  # noqa: F401  (registers the quantizer before loading checkpoints)

    models = {
        "float32": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        "bfloat16": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
    }
    for bits in BITS:
        models[f"WaterSIC {bits:g} bit"] = AutoModelForCausalLM.from_pretrained(
            quantized_dir(path, bits), dtype=torch.float32)
    return {name: m.eval() for name, m in models.items()}


def model_bits(model) -> tuple[float, float] | None:
    """(accounted rate, bits in memory) over the quantized layers, or None for float models."""
    from watersic_hf.nn import WaterSICLinear

    layers = [m for m in model.modules() if isinstance(m, WaterSICLinear)]
    if not layers:
        return None
    weights = sum(m.in_features * m.out_features for m in layers)
    memory = sum(m.bits_in_memory * m.in_features * m.out_features for m in layers) / weights
    return model.config.quantization_config.achieved_bits, memory


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per greedy decode step (one token, KV cache), prompt prefill excluded."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def bench_models(args) -> tuple[list[dict], dict]:
    from transformers import AutoTokenizer

    from watersic_hf.assets import smollm2_dir, sotu_eval_text

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(sotu_eval_text(), return_tensors="pt").input_ids
    prompt, long = ids[:, :PROMPT_TOKENS], ids[:, : args.prefill_tokens]
    models = load_models(path)
    best: dict[tuple[str, int, str], float] = {}
    loads = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for model in models.values():  # warm-up: JIT compilation, oneDNN kernels, caches
            decode_seconds(model, prompt, 2)
            prefill_seconds(model, long[:, :64])
        loads[threads] = [load_average()]
        for _ in range(args.reps):
            for name, model in models.items():
                for kind, run in (("decode", lambda m: decode_seconds(m, prompt, args.steps)),
                                  ("prefill", lambda m: prefill_seconds(m, long))):
                    key = (name, threads, kind)
                    best[key] = min(best.get(key, float("inf")), run(model))
            gc.collect()
        loads[threads].append(load_average())
        print(f"{threads} thread(s) done, load average {loads[threads]}", flush=True)
    rows = []
    for threads in THREADS:
        fp_decode, fp_prefill = best[("float32", threads, "decode")], best[
            ("float32", threads, "prefill")]
        for name, model in models.items():
            bits = model_bits(model)
            dec, pre = best[(name, threads, "decode")], best[(name, threads, "prefill")]
            rows.append(dict(
                model=name, threads=threads, rate=bits[0] if bits else None,
                memory=bits[1] if bits else None,
                decode=1 / dec, decode_ratio=fp_decode / dec,
                prefill=args.prefill_tokens / pre, prefill_ratio=fp_prefill / pre,
            ))
    return rows, loads


# ---------------------------------------------------------------------------- one big layer
def bench_layer(args) -> tuple[list[dict], dict]:
    from bench_kernels import synthetic_codes

    from watersic_hf.nn import WaterSICLinear

    out_f, in_f = 4096, 14336
    codes = synthetic_codes(out_f, in_f, 3.0)
    gen = torch.Generator().manual_seed(0)
    qw = SimpleNamespace(
        codes=codes,
        col_scale=(torch.rand(in_f, generator=gen) * 1e-3 + 1e-4).half().float(),
        row_scale=(torch.rand(out_f, generator=gen) + 0.5).half().float(),
        dead_columns=torch.empty(0, dtype=torch.int64),
    )
    layer = WaterSICLinear.from_quantized(qw, None)
    w32 = codes.float() * qw.row_scale[:, None] * qw.col_scale[None, :]  # the dequantized weight
    w16 = w32.bfloat16()
    del codes
    rows, loads = [], {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        loads[threads] = [load_average()]
        for m in (1, 512):
            x = torch.randn(m, in_f)
            x16 = x.bfloat16()
            runs = {
                "WaterSIC 3 bit (fp32 x)": lambda x=x: layer(x),
                "F.linear fp32": lambda x=x: F.linear(x, w32),
                "F.linear bf16": lambda x16=x16: F.linear(x16, w16),
            }
            reps = 20 if m == 1 else 3
            times = {}
            for name, run in runs.items():
                run()
                times[name] = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    for _ in range(reps):
                        run()
                    times[name] = min(times[name], (time.perf_counter() - start) / reps)
            for name, seconds in times.items():
                rows.append(dict(name=name, threads=threads, m=m, ms=seconds * 1e3,
                                 ratio=times["F.linear fp32"] / seconds))
        loads[threads].append(load_average())
    return rows, dict(memory=layer.bits_in_memory, loads=loads)


# ---------------------------------------------------------------------------- report
def markdown(model_rows, model_loads, layer_rows, layer_info, args) -> str:
    lines = [
        "## bench_cpu_inference: CPU inference, packed WaterSIC layers against float models",
        "",
        machine_line(),
        "",
        "Fast CPU path: `backend=\"cpu\"` (numba kernels, `watersic_hf/cpu_kernels.py`), chosen "
        "by `backend=\"auto\"` on CPU tensors. SmolLM2-135M-Instruct (the embedded model), all "
        "210 block linears quantized with RTN codes (data-free; same packed format and a similar "
        "~5–10% share of escapes as WaterSIC codes); embeddings and the tied `lm_head` stay in "
        f"float32. Decode: greedy, KV cache, {args.steps} steps after an {PROMPT_TOKENS}-token "
        f"prompt. Prefill: one forward of {args.prefill_tokens} tokens. Best of {args.reps} "
        "interleaved repetitions; ratios are to float32 at the same thread count. Load average "
        "(1/5/15 min) before / after each thread count: "
        + "; ".join(f"{t} thread(s): {v[0]} → {v[1]}" for t, v in model_loads.items()) + ".",
        "",
        "| model | threads | rate (bits) | bits in memory | decode tok/s | × fp32 | "
        f"prefill-{args.prefill_tokens} tok/s | × fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in model_rows:
        rate = f"{r['rate']:.3f}" if r["rate"] is not None else "–"
        mem = f"{r['memory']:.3f}" if r["memory"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['threads']} | {rate} | {mem} | {r['decode']:.2f} | "
            f"{r['decode_ratio']:.2f} | {r['prefill']:.1f} | {r['prefill_ratio']:.2f} |")
    lines += [
        "",
        "One 4096×14336 layer (out × in, Llama-3-8B `down_proj`), synthetic WaterSIC-like codes "
        f"at 3 bits ({layer_info['memory']:.3f} bits in memory), against `F.linear` with the "
        "dequantized weight in fp32 and bf16. Time per call, best of "
        f"{args.reps}; × = speed relative to fp32 `F.linear`. Load average: "
        + "; ".join(f"{t} thread(s): {v[0]} → {v[1]}" for t, v in layer_info["loads"].items())
        + ".",
        "",
        "| kernel | threads | M | ms | × fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in layer_rows:
        lines.append(f"| {r['name']} | {r['threads']} | {r['m']} | {r['ms']:.2f} | "
                     f"{r['ratio']:.2f} |")
    lines += ["", "Command: `python benchmarks/bench_cpu_inference.py`."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-layer", action="store_true", help="skip the 4096×14336 layer")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    saved = torch.get_num_threads()
    model_rows, model_loads = bench_models(args)
    for r in model_rows:
        print(r, flush=True)
    layer_rows, layer_info = ([], {"memory": float("nan"), "loads": {}})
    if not args.skip_layer:
        layer_rows, layer_info = bench_layer(args)
        for r in layer_rows:
            print(r, flush=True)
    torch.set_num_threads(saved)
    md = markdown(model_rows, model_loads, layer_rows, layer_info, args)
    print(md)
    if not args.no_report:
        update_section("bench_cpu_inference", md)


if __name__ == "__main__":
    main()
