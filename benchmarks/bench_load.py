"""Load time and size of WaterSIC checkpoints: fp32 original vs entropy vs packed storage.

Writes the section ``bench_load`` of docs/benchmarks.md.

    python benchmarks/bench_load.py

SmolLM2-135M is quantized once with ``method="rtn"`` at 3 bits (the loading cost does not depend
on the method) on a tiny calibration set, and saved with ``storage="entropy"`` and
``storage="packed"``. Each folder is then loaded with ``from_pretrained`` three times after one
warm-up load (warm file cache); the best wall time is reported. The entropy load includes the
decoding of every stream and the repacking into the in-memory format.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine_line, update_section  # noqa: E402

import watersic_hf  # noqa: E402
from watersic_hf import WaterSICConfig  # noqa: E402
from watersic_hf.assets import default_calibration_texts, smollm2_dir  # noqa: E402


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def _best_load(path: str, repeats: int) -> float:
    AutoModelForCausalLM.from_pretrained(path)  # warm-up: file cache, imports
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path)
        best = min(best, time.perf_counter() - start)
        del model
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=float, default=3.0)
    args = parser.parse_args()

    src = str(smollm2_dir())
    cfg = WaterSICConfig(bits=args.bits, method="rtn", dataset=default_calibration_texts(),
                         nsamples=4, seqlen=128)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    t_quant = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for storage in ("entropy", "packed"):
            model.config.quantization_config.storage = storage
            model.hf_quantizer.quantization_config.storage = storage
            dirs[storage] = os.path.join(tmp, storage)
            t0 = time.perf_counter()
            model.save_pretrained(dirs[storage])
            print(f"saved {storage} in {time.perf_counter() - t0:.1f} s", flush=True)
        reports = {s: watersic_hf.report(model, storage=s) for s in dirs}
        del model
        gc.collect()
        t_fp32 = _best_load(src, args.repeats)
        rows.append(("fp32 original", t_fp32, _folder_bytes(src), None))
        for storage, path in dirs.items():
            t = _best_load(path, args.repeats)
            rows.append((f"WaterSIC {storage}", t, _folder_bytes(path), reports[storage]))
            print(f"{storage}: {t:.2f} s", flush=True)

    lines = [
        "## bench_load: from_pretrained time and checkpoint size",
        "",
        machine_line(),
        "",
        f"SmolLM2-135M, `method=\"rtn\"`, {args.bits:g} bits, calibration 4×128 tokens "
        f"(quantization took {t_quant:.0f} s). Best of {args.repeats} loads after a warm-up "
        "(warm file cache), default threads, CPU. Sizes are the `.safetensors` files (the "
        "embeddings and norms stay in fp32 in every checkpoint). Bits per quantized weight are "
        "from `watersic_hf.report` (bias excluded).",
        "",
        "| checkpoint | load (s) | × fp32 load | safetensors (MB) | bits on disk | "
        "bits in memory | entropy bits | rate bits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t, size, rep in rows:
        bits = ("—", "—", "—", "—") if rep is None else tuple(
            f"{rep[k]:.3f}" for k in ("bits_on_disk", "bits_in_memory", "entropy_bits",
                                      "rate_bits"))
        lines.append(f"| {label} | {t:.2f} | {t / t_fp32:.2f} | {size / 1e6:.1f} | "
                     + " | ".join(bits) + " |")
    ratio = rows[1][1] / t_fp32
    lines += ["", f"Goal: entropy load ≤ 2× the fp32 load — measured {ratio:.2f}× "
              f"({'met' if ratio <= 2 else 'NOT met'})."]
    text = "\n".join(lines)
    print(text)
    update_section("bench_load", text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
