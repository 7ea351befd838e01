"""Rate vs perplexity of a whole model: WaterSIC, GPTQ and RTN (same pipeline).

For each method and target rate the model is quantized through ``from_pretrained(...,
quantization_config=WaterSICConfig(...))``, saved, and measured: the achieved rate (entropy
accounting; for standard GPTQ its fixed rate, ``bits`` per code plus 16 bits per scale), the bits
per weight in memory (``WaterSICLinear.bits_in_memory`` weighted by layer size) and on disk,
perplexity and KL(P_float ‖ P_quantized) on the SOTU 2010-2013 text
(protocol of :mod:`watersic_hf.evaluation`: first 4096 tokens, 512-token windows). Every point is
appended to a JSON file as soon as it is measured, so an interrupted sweep resumes where it stopped.
The script then draws ``docs/rate_ppl.png`` and rewrites the ``rate_ppl`` section of
``docs/benchmarks.md``.

Usage:
    python benchmarks/bench_rate_ppl_plot.py                 # SmolLM2-135M, 3 methods x 4 rates
    python benchmarks/bench_rate_ppl_plot.py --quick         # 2 methods x 2 rates, 8 x 256 tokens
    python benchmarks/bench_rate_ppl_plot.py --plot-only     # redraw from the JSON file
    python benchmarks/bench_rate_ppl_plot.py --model DIR --eval-text FILE --no-doc   # any model
    python benchmarks/bench_rate_ppl_plot.py --methods gptq,gptq_entropy --bits 3,4

Methods: ``watersic`` (fixed (eps_q, eps_a) mix), ``watersic_ft``, ``gptq`` (standard GPTQ,
``w{bits} g{--gptq-group-size}``; only whole ``--bits`` in [2, 8] are run for it, others are
skipped), ``gptq_entropy`` (entropy-coded single-step GPTQ) and ``rtn``.

On the project's 2-core CPU host one SmolLM2 point at 32 x 512 calibration tokens takes about
25 minutes (see ``watersic-quantize``'s estimate); a GPU run uses 128 x 2048 tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import torch
from _report import machine_line, update_section

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "rate_ppl.json"
DEFAULT_PLOT = ROOT / "docs" / "rate_ppl.png"
METHOD_STYLE = {
    "watersic": ("WaterSIC", "o-"),
    "watersic_ft": ("WaterSIC-FT", "*-"),
    "gptq": ("GPTQ", "D-."),
    "gptq_entropy": ("GPTQ (entropy-coded)", "s--"),
    "rtn": ("RTN (entropy-coded)", "^:"),
}


def method_label(method: str, bits: float | None = None, group_size: int | None = None) -> str:
    """Display name of a method; standard GPTQ names its grid, e.g. ``GPTQ (w4 g128)``."""
    if method != "gptq":
        return METHOD_STYLE[method][0]
    group = "per-channel" if not group_size or group_size < 1 else f"g{group_size}"
    width = "" if bits is None else f"w{bits:g} "
    return f"GPTQ ({width}{group})"


def memory_bits(model: Any) -> float:
    """Bits per weight in memory: ``WaterSICLinear.bits_in_memory`` weighted by ``in · out``."""
    from watersic_hf import WaterSICLinear

    layers = [m for m in model.modules() if isinstance(m, WaterSICLinear)]
    total = sum(m.in_features * m.out_features for m in layers)
    return sum(m.bits_in_memory * m.in_features * m.out_features for m in layers) / total


def size_bits(model: Any) -> tuple[float, float]:
    """``(bits per weight in memory, bits per weight on disk)`` of a quantized model; the disk
    figure comes from saving it to a temporary folder."""
    from watersic_hf.evaluation import disk_bits

    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        model.save_pretrained(tmp)
        disk = disk_bits(tmp, model.config.quantization_config.layers)
    return memory_bits(model), disk["bits_per_weight"]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_results(path: pathlib.Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"points": [], "float": None}


def _key(point: dict[str, Any]) -> tuple:
    return (
        point["model"],
        point["method"],
        float(point["bits_target"]),
        point["nsamples"],
        point["seqlen"],
        point["eval_text"],
        point.get("group_size"),
    )


def _error_fields(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean in-sample and held-out relative output error and the median damping (WaterSIC)."""
    rel = [m["rel_err"] for m in layers.values() if m.get("rel_err") is not None]
    held = [m["heldout_rel_err"] for m in layers.values() if m.get("heldout_rel_err") is not None]
    damps = sorted(m["damp"] for m in layers.values() if m.get("damp") is not None)
    return {
        "rel_err_mean": sum(rel) / len(rel) if rel else None,
        "heldout_rel_err_mean": sum(held) / len(held) if held else None,
        "damp_median": damps[len(damps) // 2] if damps else None,
    }


def measure_point(
    model_dir: str,
    tokenizer: Any,
    reference: Any,
    eval_text: str | None,
    method: str,
    bits: float,
    nsamples: int,
    seqlen: int,
    device: str,
    eval_kw: dict[str, Any],
    gptq_group_size: int = 128,
    keep_dir: pathlib.Path | None = None,
    finetune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize ``model_dir`` once and measure rate, bits on disk, perplexity and KL.

    ``method="watersic_ft"``: the WaterSIC checkpoint (``keep_dir/w{bits}`` when it exists, else
    quantized now) is fine-tuned with :func:`watersic_hf.finetune_scales` on the calibration
    windows, with ``reference`` as teacher (``finetune``: steps / lr overrides).
    """
    from transformers import AutoModelForCausalLM

    from watersic_hf import WaterSICConfig
    from watersic_hf.evaluation import kl_divergence, perplexity

    base_method = "watersic" if method == "watersic_ft" else method
    kept = (keep_dir / f"w{bits:g}") if keep_dir is not None and base_method == "watersic" else None
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if kept is not None and (kept / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32)
        extra["checkpoint"] = str(kept)
    else:
        config = WaterSICConfig(
            bits=bits,
            method=base_method,
            nsamples=nsamples,
            seqlen=seqlen,
            device=device,
            tokenizer=tokenizer,
            gptq_group_size=gptq_group_size,
            # the fixed (eps_q, eps_a) mix at every rate, so the curve is one recipe (the default
            # searches eps below 2.5 bits; bench_ablation.py measures what that changes)
            adaptive_eps=False,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
        if kept is not None:  # written whole, then renamed into place
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{kept.name}.", dir=kept.parent))
            model.save_pretrained(tmp_dir)
            os.replace(tmp_dir, kept)
    seconds = time.perf_counter() - start
    if method == "watersic_ft":
        import watersic_hf
        from watersic_hf.integration.data import calibration_windows

        windows = calibration_windows(None, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
        report = watersic_hf.finetune_scales(
            model, windows, reference, watersic_hf.FinetuneSettings(**(finetune or {}))
        )
        extra["finetune"] = report.to_dict()
        seconds += report.seconds
    qc = model.config.quantization_config
    memory, disk = size_bits(model)
    ppl = perplexity(model, tokenizer, eval_text, **eval_kw)
    kl = kl_divergence(model, reference, tokenizer, eval_text, **eval_kw)
    point = {
        "method": method,
        "bits_target": bits,
        "achieved_bits": qc.achieved_bits,
        "bits_on_disk": disk,
        "bits_in_memory": memory,
        "ppl": ppl["ppl"],
        "kl_bits": kl["kl_bits"],
        "top1_agreement": kl["top1_agreement"],
        "quantize_seconds": seconds,
        "protocol": ppl["protocol"],
        **_error_fields(qc.layers),
        **extra,
    }
    del model
    gc.collect()
    return point


def plot(results: dict[str, Any], out: pathlib.Path, title: str, ylabel: str) -> None:
    """Perplexity (log axis) against the achieved rate, one line per method, float as a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # The interesting range: up to 8x the float perplexity (or the largest point below that).
    fp = results["float"]["ppl"] if results.get("float") else None
    top = 8.0 * fp if fp else max(p["ppl"] for p in results["points"])
    for method, (label, style) in METHOD_STYLE.items():
        mine = [p for p in results["points"] if p["method"] == method]
        for group in sorted({p.get("group_size") or 0 for p in mine}):
            # x: bits per weight held in memory (what a user's GPU holds), for every method.
            pts = sorted((p["bits_in_memory"], p["ppl"], p["bits_target"]) for p in mine
                         if (p.get("group_size") or 0) == group)
            if method == "gptq":
                widths = ",".join(f"{b:g}" for b in sorted({b for *_, b in pts}))
                label = method_label(method, None, group).replace("(", f"(w{widths} ", 1)
            # Points far off the scale (a collapsed 2-bit grid) sit on the top edge, labelled.
            ys = [min(y, top) for _, y, _ in pts]
            line = ax.plot([x for x, *_ in pts], ys, style, label=label)[0]
            for (x, y, _), yc in zip(pts, ys, strict=True):
                if y > top:
                    ax.annotate(f"{y:.0f}", (x, yc), textcoords="offset points", xytext=(6, -12),
                                fontsize=8, color=line.get_color())
    if results.get("float"):
        ax.axhline(results["float"]["ppl"], color="gray", lw=1, label="float (fp32)")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.15)
    # Plain numbers on the log axis; no minor labels (they collide on a narrow range).
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0,
                                                                           5.0, 7.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bits per weight in memory (codes, scales and layout; as loaded)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(out, buf.getvalue())


def markdown(results: dict[str, Any], plot_path: pathlib.Path) -> str:
    points = sorted(results["points"], key=lambda p: (p["method"], p["bits_target"]))
    lines = [
        "## Rate vs perplexity (`benchmarks/bench_rate_ppl_plot.py`)",
        "",
        results.get("machine", ""),
        "",
        f"Model: {results.get('model_name', '?')}; calibration "
        f"{results.get('nsamples')} x {results.get('seqlen')} tokens. Perplexity protocol: "
        f"{points[0]['protocol'] if points else ''}. KL is KL(P_float ‖ P_quantized) per token. "
        "WaterSIC: default settings with the fixed (eps_q, eps_a) mix at every rate (the "
        "default searches it below 2.5 bits: `ablation_2bit`); WaterSIC-FT: one epoch of "
        "scale fine-tuning on the WaterSIC checkpoint, its time included.",
        "",
        "| method | target bits | achieved bits | bits in memory | bits on disk | ppl "
        "| KL (bits/token) | top-1 agree | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if results.get("float"):
        lines.append(
            f"| float (fp32) | 32 | – | 32 | – | {results['float']['ppl']:.3f} | 0 | 100% | – |"
        )
    for p in points:
        memory = p.get("bits_in_memory")  # absent in points measured before it was recorded
        lines.append(
            f"| {method_label(p['method'], p['bits_target'], p.get('group_size'))} | "
            f"{p['bits_target']:g} | {p['achieved_bits']:.4f} | "
            f"{'–' if memory is None else f'{memory:.3f}'} | "
            f"{p['bits_on_disk']:.3f} | {p['ppl']:.3f} | {p['kl_bits']:.4f} | "
            f"{100 * p['top1_agreement']:.1f}% | {p['quantize_seconds']:.0f} |"
        )
    try:
        rel = plot_path.relative_to(ROOT / "docs")
    except ValueError:
        rel = plot_path
    lines += ["", f"![rate vs perplexity]({rel.as_posix()})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--eval-text", help="evaluation text file (default: SOTU 2010-2013)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument(
        "--eval-max-tokens", type=int, default=4096, help="tokens evaluated (default 4096)"
    )
    p.add_argument("--methods", default="watersic,watersic_ft,gptq,rtn")
    p.add_argument("--keep-dir", type=pathlib.Path,
                   help="save every WaterSIC checkpoint as DIR/w{bits} (and reuse it): "
                   "watersic_ft fine-tunes those instead of calibrating again, and "
                   "bench_finetune.py --checkpoint-dir DIR reads them")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="WaterSIC-FT steps (default: watersic_hf's, 2 epochs on the CPU)")
    p.add_argument("--finetune-lr", type=float, default=None)
    p.add_argument("--gptq-group-size", type=int, default=128,
                   help="columns per scale of standard GPTQ (0: per-channel; default 128)")
    p.add_argument("--bits", default="2,2.5,3,4")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS)
    p.add_argument("--plot", type=pathlib.Path, default=DEFAULT_PLOT)
    p.add_argument(
        "--quick", action="store_true", help="watersic+rtn at 3 and 4 bits, 8 x 256 tokens"
    )
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import watersic_hf  # noqa: F401  (registers the quantizer)
    from watersic_hf import assets
    from watersic_hf.evaluation import perplexity

    model_dir = args.model or str(assets.smollm2_dir())
    model_name = "SmolLM2-135M-Instruct (fp32, dequantized Q4_1)" if not args.model else model_dir
    eval_text = pathlib.Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else None
    text_name = pathlib.Path(args.eval_text).name if args.eval_text else "sotu-2010-2013"
    cuda = args.device.startswith("cuda")
    nsamples = args.nsamples or (8 if args.quick else 128 if cuda else 32)
    seqlen = args.seqlen or (256 if args.quick else 2048 if cuda else 512)
    methods = ["watersic", "rtn"] if args.quick else args.methods.split(",")
    bits_list = [3.0, 4.0] if args.quick else [float(b) for b in args.bits.split(",")]
    for m in methods:
        if m not in METHOD_STYLE:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHOD_STYLE)}")

    eval_kw = {"seqlen": args.eval_seqlen, "max_tokens": args.eval_max_tokens}
    results = _load_results(args.results)
    if not args.plot_only:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if results.get("float") is None or results["float"].get("model") != model_dir:
            results["float"] = {
                "model": model_dir,
                "ppl": perplexity(reference, tokenizer, eval_text, **eval_kw)["ppl"],
            }
        results.update(
            model_name=model_name, nsamples=nsamples, seqlen=seqlen, machine=machine_line()
        )
        done = {_key(pt) for pt in results["points"]}
        for method in methods:
            for bits in bits_list:
                base = {
                    "model": model_dir,
                    "method": method,
                    "bits_target": bits,
                    "nsamples": nsamples,
                    "seqlen": seqlen,
                    "eval_text": text_name,
                }
                if method == "gptq":
                    if not bits.is_integer() or not 2 <= bits <= 8:
                        print(f"gptq: skipping --bits {bits:g} (standard GPTQ needs a whole "
                              "number of bits in [2, 8])", flush=True)
                        continue
                    base["group_size"] = args.gptq_group_size
                if _key(base) in done:
                    continue
                point = {
                    **base,
                    **measure_point(
                        model_dir,
                        tokenizer,
                        reference,
                        eval_text,
                        method,
                        bits,
                        nsamples,
                        seqlen,
                        args.device,
                        eval_kw,
                        args.gptq_group_size,
                        args.keep_dir,
                        {k: v for k, v in (("steps", args.finetune_steps),
                                           ("lr", args.finetune_lr)) if v is not None},
                    ),
                }
                print(
                    f"{method_label(method, bits, base.get('group_size')):20s} target {bits:g}: "
                    f"rate {point['achieved_bits']:.4f}, memory {point['bits_in_memory']:.3f}, "
                    f"disk {point['bits_on_disk']:.3f}, ppl {point['ppl']:.3f}, "
                    f"KL {point['kl_bits']:.4f} bits, {point['quantize_seconds']:.0f} s",
                    flush=True,
                )
                results["points"].append(point)
                _atomic_write(args.results, json.dumps(results, indent=1).encode())
    if not results["points"]:
        print("no points measured yet", file=sys.stderr)
        return 1
    title = f"{model_name.split(' (')[0]}: rate vs perplexity"
    ylabel = f"perplexity ({text_name}, {args.eval_max_tokens} tokens)"
    plot(results, args.plot, title, ylabel)
    if not args.no_doc:
        update_section("rate_ppl", markdown(results, args.plot))
    print(f"plot written to {args.plot}")
    return 0 if all(math.isfinite(pt["ppl"]) for pt in results["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
