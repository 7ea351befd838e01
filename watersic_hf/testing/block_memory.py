"""Measure the peak RSS of calibrating one random Llama-shaped block on the CPU.

Run in a fresh process (``python -m watersic_hf.testing.block_memory --hidden ...``) so that
nothing else shares the heap. The peak is taken from the kernel's high-water mark ``VmHWM``,
reset (``/proc/self/clear_refs`` = 5) right before the calibration starts, minus the resident set
at that moment; it is printed as one JSON line together with the memory model's prediction
(:mod:`watersic_hf.integration.engine.memory`).

Run it with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc otherwise raises its mmap threshold after the
first large free (up to 32 MB), after which freed blocks below that size stay resident, and the
RSS measures the allocator's history rather than the live bytes the model counts (blocks above
32 MB, i.e. all the big matrices of a large model, are returned either way).
"""

from __future__ import annotations

import argparse
import gc
import json
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure(hidden: int, intermediate: int, heads: int, kv_heads: int, nsamples: int,
            seqlen: int, threads: int | None = None) -> dict[str, object]:
    """Calibrate a 1-block random Llama and return measured and predicted peak bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import watersic_hf
    from watersic_hf.integration.calibrate import calibrate_model
    from watersic_hf.integration.engine.memory import block_peak, llama_groups

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256,
                         max_position_embeddings=max(seqlen, 128))
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 256, (seqlen,), generator=g) for _ in range(nsamples)]
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=ids, nsamples=nsamples, seqlen=seqlen)
    # Warm-up on a tiny block: lazy imports (the quantized Linear, its kernels), thread pools and
    # BLAS workspaces are then resident before the baseline, so the difference is the data.
    small = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=256)).eval()
    calibrate_model(small, watersic_hf.WaterSICConfig(bits=3, dataset=ids[:2], nsamples=2,
                                                      seqlen=min(seqlen, 32)),
                    modules_to_not_convert=["lm_head"])
    del small
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    pred = block_peak(llama_groups(hidden, intermediate, heads, kv_heads), hidden,
                      nsamples * seqlen, separate_paths=False)
    return {
        "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
        "tokens": nsamples * seqlen, "seconds": seconds,
        "measured_bytes": (peak - base) * 1024, "predicted_bytes": pred["peak"],
        "predicted_group": pred["group"], "predicted_stats": pred["stats"],
        "predicted_activations": pred["activations"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    print(json.dumps(measure(a.hidden, a.intermediate, a.heads, a.kv_heads, a.nsamples,
                             a.seqlen, a.threads)))


if __name__ == "__main__":
    main()
