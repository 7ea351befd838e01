"""Single-layer benchmark: WaterSIC vs entropy-coded GPTQ vs RTN, and blocked vs column ZSIC.

For each shape (a, n) and rate, quantizes a random Gaussian weight with unequal column scales
against a random ill-conditioned Σ_X and reports the achieved rate (paper accounting), the
relative output error tr((W−Ŵ)Σ(W−Ŵ)ᵀ)/tr(WΣWᵀ) and the wall time. Then times the blocked ZSIC
loop against the plain column loop (the test oracle) at 4096×4096.

Usage:
    python benchmarks/bench_algorithm.py            # full run, rewrites docs/benchmarks.md section
    python benchmarks/bench_algorithm.py --quick    # small shapes only, prints, no doc update
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _report import machine_line, update_section

from watersic_hf.algorithm import gptq_quantize, rtn_quantize, watersic_quantize
from watersic_hf.algorithm.zsic import zsic, zsic_reference

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
QUICK_SHAPES = [(576, 576), (1536, 576), (576, 1536)]
BITS = (2.0, 3.0, 4.0)
METHODS = (("watersic", watersic_quantize), ("gptq", gptq_quantize), ("rtn", rtn_quantize))


def make_layer(a: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian W (float32) with log-normal column scales; Σ = Q diag(λ) Qᵀ, λ over 4 decades
    with a few 100× outlier features (LLM-like activations)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(a, n, generator=gen) * torch.exp(0.5 * torch.randn(n, generator=gen))
    lam = 10.0 ** (-4.0 * torch.rand(n, generator=gen, dtype=torch.float64))
    lam[torch.randperm(n, generator=gen)[: max(1, n // 256)]] *= 100.0
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    sigma = (q * lam[None, :]) @ q.T
    return w, (0.5 * (sigma + sigma.T)).float()


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    w, e, s = w.double(), (w.double() - w_hat.double()), sigma.double()
    return float(((e @ s) * e).sum() / ((w @ s) * w).sum())


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_methods(shapes, repeats_small: int) -> tuple[list[str], dict]:
    rows, times = [], {}
    for a, n in shapes:
        w, sigma = make_layer(a, n)
        reps = 1 if a * n > 4_000_000 else repeats_small
        for bits in BITS:
            for name, fn in METHODS:
                q, t = timed(lambda fn=fn, w=w, s=sigma, b=bits: fn(w, s, b), reps)
                err = rel_error(w, q.dequantize(), sigma)
                times[(a, n, bits, name)] = t
                rows.append(f"| {a}×{n} | {bits:g} | {name} | {q.rate_bits:.3f} | {err:.4g} | "
                            f"{t:.2f} |")
                print(rows[-1], flush=True)
    return rows, times


def loop_speed(a: int, n: int) -> tuple[float, float, bool]:
    w, sigma = make_layer(a, n, seed=1)
    chol = torch.linalg.cholesky(sigma.double() + 1e-4 * float(sigma.diagonal().mean())
                                 * torch.eye(n, dtype=torch.float64))
    y = w.double() @ chol
    steps = torch.full((n,), 0.05, dtype=torch.float64)
    (z_blk, _), t_blk = timed(lambda: zsic(y, chol, steps), 1)
    (z_ref, _), t_ref = timed(lambda: zsic_reference(y, chol, steps), 1)
    return t_blk, t_ref, bool(torch.equal(z_blk, z_ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only; no doc update")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats for small shapes")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    rows, times = run_methods(QUICK_SHAPES if args.quick else SHAPES, args.repeats)
    if args.quick:
        return
    t_blk, t_ref, same = loop_speed(4096, 4096)
    print(f"ZSIC 4096x4096 fp64: blocked {t_blk:.2f} s, column loop {t_ref:.2f} s, "
          f"identical codes: {same}", flush=True)
    load1 = os.getloadavg()[0]
    big = [(times[(4096, 4096, b, "watersic")], times[(4096, 4096, b, "gptq")]) for b in BITS]
    ratios = [ws / gp for ws, gp in big]
    md = [
        machine_line(),
        f"Load average (1 min) at start / end: {load0:.1f} / {load1:.1f} — the 2 CPU cores were "
        "shared with other jobs, so times are indicative (small shapes: best of "
        f"{args.repeats}; 4096×4096: one run).",
        "",
        "Random Gaussian W with log-normal column scales (σ = 0.5 in log space); "
        "Σ_X = Q diag(λ) Qᵀ with λ log-uniform over 4 decades and 1 in 256 features ×100. "
        "Rate = pooled code entropy + 16-bit row/column scales, bits per weight "
        "(`QuantizedWeight.rate_bits`). Error = tr((W−Ŵ)Σ(W−Ŵ)ᵀ)/tr(WΣWᵀ). "
        "WaterSIC: LMMSE + rescalers (defaults); GPTQ: one step Δ, same SIC feedback, no LMMSE; "
        "RTN: per-row step, no feedback. All rate-matched by the same secant search.",
        "",
        "| shape (a×n) | bits | method | rate | rel. error | time (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "ZSIC loop at 4096×4096 (fp64, c fixed): blocked (128-column lazy batches) "
        f"**{t_blk:.2f} s** vs column loop (`zsic_reference`) **{t_ref:.2f} s** "
        f"(**{t_ref / t_blk:.1f}×** faster; identical codes: {same}). Goal ≥ 3×: "
        f"{'met' if t_ref / t_blk >= 3 else 'NOT met'}.",
        "",
        "WaterSIC / GPTQ time at 4096×4096: "
        + ", ".join(f"{b:g} bits {r:.2f}×" for b, r in zip(BITS, ratios, strict=True))
        + f". Goal ≤ 1.5×: {'met' if max(ratios) <= 1.5 else 'NOT met'}"
        + ("" if max(ratios) <= 1.5 else
           " — WaterSIC runs the diagonal rescalers (fp64 Gram matrix, a row quadratic form and "
           "an n×n Cholesky solve per iteration, ~2 iterations), which GPTQ does not; with "
           "`rescale=False` the two cost the same."),
    ]
    update_section("bench_algorithm", "## Single-layer quantizers (bench_algorithm)\n\n"
                   + "\n".join(md))


if __name__ == "__main__":
    main()
