"""Save and load of WaterSIC checkpoints (format v2) at SmolLM2 and Llama-3-8B scale.

Writes the section ``bench_load`` of docs/benchmarks.md.

    python benchmarks/bench_load.py                 # everything (about 20 minutes on 2 cores)
    python benchmarks/bench_load.py --skip-8b       # SmolLM2 and the single layer only
    python benchmarks/bench_load.py --only-8b       # the 8B-shaped model only (own section)
    python benchmarks/bench_load.py --only-8b --keep DIR   # keep its checkpoints; run again
                                                    # with the same DIR to re-time the loads

Three parts:

1. **One 4096×14336 layer at 3 bits** (synthetic codes with WaterSIC-like per-column spreads):
   encode and decode + pack throughput in M codes/s per core (CPU time of all threads, and wall
   time with one thread), bits per code on disk for format 2 and format 1, and the cost of the
   stored layout (permutation and group table) in bits per weight.
2. **SmolLM2-135M at 3 bits** (``method="rtn"``: the loading cost does not depend on the method):
   save time, load time (entropy, packed, and the original float checkpoint), bits.
3. **A Llama-3-8B-shaped model** (32 blocks, hidden 4096, intermediate 14336, vocab 128256,
   bf16 embeddings and head) whose 224 quantized layers carry synthetic 3-bit codes: the seven
   layers of one block are generated and packed once, and every block gets its own row
   permutation of them (different words, same statistics). Save time and load time to CPU for
   entropy and packed storage and for the same model as plain bf16 safetensors, with the peak
   RSS of each load (measured in a fresh process, which includes the ~0.5 GB of Python, torch
   and transformers).

Every load runs in a fresh subprocess with a warm file cache (one untimed load first).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine_line, update_section  # noqa: E402

import watersic_hf  # noqa: E402
from watersic_hf import WaterSICConfig, WaterSICLinear, packing  # noqa: E402
from watersic_hf.quantizer import WaterSICHfQuantizer  # noqa: E402
from watersic_hf.storage import decode_codes, decode_codes_packed, encode_codes  # noqa: E402
from watersic_hf.storage.checksum import verify_safetensors_files  # noqa: E402
from watersic_hf.storage.layout import pack_with_layout, validate_layout  # noqa: E402

LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, tie_word_embeddings=False)
BLOCK_LINEARS = {  # name: (out, in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096), "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def synthetic_codes(n_out: int, n_in: int, bits: float, seed: int) -> torch.Tensor:
    """Codes with log-normal per-column spreads around ``bits`` of Gaussian entropy, plus a few
    outliers (what WaterSIC's waterfilling produces)."""
    g = torch.Generator().manual_seed(seed)
    # Gaussian entropy log2(sigma * sqrt(2 pi e)): sigma = 2^(bits - 2.047) on average
    sigma = 2.0 ** (bits - 2.047) * torch.exp(0.5 * torch.randn(n_in, generator=g))
    z = torch.round(torch.randn(n_out, n_in, generator=g) * sigma)
    idx = torch.randint(0, n_out * n_in, (n_out * n_in // 10_000,), generator=g)
    z.view(-1)[idx] *= 20
    return z.to(torch.int32)


def _cpu_and_wall(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def bench_layer(bits: float) -> list[str]:
    n_out, n_in = 4096, 14336
    z = synthetic_codes(n_out, n_in, bits, seed=0)
    t0 = time.perf_counter()
    packed = packing.pack_codes(z)
    t_layout = time.perf_counter() - t0
    perm = packed.tensors["weight_perm"]
    meta = validate_layout(perm, packed.tensors["weight_group_meta"], packed.layout, n_in, n_out,
                           name="layer")
    zp = z[:, perm.long()].contiguous()
    encode_codes(zp[:64, :64])  # compile the numba loops outside the timings
    enc, enc_cpu, enc_wall = _cpu_and_wall(lambda: encode_codes(zp))
    n = z.numel()

    def decode_pack():  # what the loader runs: decode a few segments, pack them, repeat
        return decode_codes_packed(enc, meta, packed.layout, name="layer")

    decode_pack()
    separate = []  # the two steps apart, for the record (the loader never does this)
    codes = decode_codes(enc, verify=False).numpy()
    for fn in (lambda: decode_codes(enc, verify=False),
               lambda: pack_with_layout(codes, meta, packed.layout, name="layer")):
        fn()
        separate.append(min(_cpu_and_wall(fn)[1] for _ in range(3)))
    runs = [_cpu_and_wall(decode_pack) for _ in range(3)]
    out = runs[0][0]
    cpu, wall = min(r[1] for r in runs), min(r[2] for r in runs)
    assert all(torch.equal(out[k], packed.tensors[k]) for k in out)
    v1 = encode_codes(zp, coder="rans")
    bits_v2 = 8 * (enc.stream.numel() + enc.model.numel()) / n
    bits_v1 = 8 * (v1.stream.numel() + v1.model.numel()) / n
    layout_bits = 8 * (perm.numel() * 4 + packed.tensors["weight_group_meta"].numel() * 4) / n
    entropy = watersic_hf.storage.per_column_entropy_bits(z)
    lines = [
        f"### One {n_out}×{n_in} layer, synthetic {bits:g}-bit codes",
        "",
        f"Per-column entropy {entropy:.4f} bits. Stored streams: format 2 {bits_v2:.4f} bits per "
        f"code, format 1 (lockstep rANS) {bits_v1:.4f} (difference {bits_v2 - bits_v1:+.4f}). "
        f"The stored layout (int32 permutation + group table) adds {layout_bits:.4f} bits per "
        f"weight. Choosing that layout at quantization time (`pack_codes`) took "
        f"{t_layout:.1f} s; loading never does it again.",
        "",
        "| step | threads | CPU time (s) | wall (s) | M codes/s per core (CPU time) |",
        "|---|---:|---:|---:|---:|",
        f"| encode (save) | {numba.config.NUMBA_NUM_THREADS} | {enc_cpu:.2f} | {enc_wall:.2f} | "
        f"{n / enc_cpu / 1e6:.0f} |",
    ]
    lines.append(f"| decode + pack (load) | 1 | {cpu:.2f} | {wall:.2f} | {n / cpu / 1e6:.0f} |")
    lines += ["", f"The same two steps apart (best of 3, CPU time): decoding alone "
              f"{n / separate[0] / 1e6:.0f} M codes/s, packing alone {n / separate[1] / 1e6:.0f} "
              "M codes/s. The loader decodes 2^22 codes at a time and packs them while they are "
              "in cache; load parallelism comes from decoding layers on several threads."]
    return lines


# ---------------------------------------------------------------------------- loads
_LOAD = textwrap.dedent("""
    import json, sys, time, torch
    import watersic_hf
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    wall = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its
    # parent's peak
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(json.dumps({"wall": wall, "model_bytes": size, "peak_rss": int(status) * 1024}))
""")


def timed_load(path: str, warm: bool = True) -> dict:
    """Load ``path`` in a fresh process (after one untimed load when ``warm``)."""
    runs = 2 if warm else 1
    out = {}
    for _ in range(runs):
        # cwd: not the repository root, whose kernels/ folder would shadow the name `kernels`
        proc = subprocess.run([sys.executable, "-c", _LOAD, path], capture_output=True,
                              text=True, timeout=3600, cwd=os.path.dirname(path))
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def _save(model, path: str, storage: str) -> tuple[float, float]:
    model.config.quantization_config.storage = storage
    model.hf_quantizer.quantization_config.storage = storage
    c0, t0 = time.process_time(), time.perf_counter()
    model.save_pretrained(path)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_smollm2(bits: float, tmp: str) -> list[str]:
    from watersic_hf.assets import default_calibration_texts, smollm2_dir

    src = str(smollm2_dir())
    cfg = WaterSICConfig(bits=bits, method="rtn", dataset=default_calibration_texts(),
                         nsamples=4, seqlen=128)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    n_codes = sum(m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, WaterSICLinear))
    lines = [f"### SmolLM2-135M, {bits:g} bits (`method=\"rtn\"`)", "",
             "| checkpoint | save (s) | save M codes/s per core | load (s) | × float load | "
             "safetensors (MB) | peak RSS (MB) | bits on disk | bits in memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = timed_load(src)
    results = []
    for storage in ("entropy", "packed"):
        path = os.path.join(tmp, f"smollm2-{storage}")
        wall, cpu = _save(model, path, storage)
        rep = watersic_hf.report(model, storage=storage)
        results.append((storage, path, wall, cpu, rep))
    del model
    gc.collect()
    lines.append(f"| float original (fp32) | — | — | {base['wall']:.2f} | 1.00 | "
                 f"{_folder_bytes(src) / 1e6:.0f} | {base['peak_rss'] / 1e6:.0f} | — | — |")
    for storage, path, wall, cpu, rep in results:
        load = timed_load(path)
        lines.append(
            f"| WaterSIC {storage} | {wall:.2f} | {n_codes / cpu / 1e6:.1f} | "
            f"{load['wall']:.2f} | {load['wall'] / base['wall']:.2f} | "
            f"{_folder_bytes(path) / 1e6:.0f} | {load['peak_rss'] / 1e6:.0f} | "
            f"{rep['bits_on_disk']:.3f} | {rep['bits_in_memory']:.3f} |")
    lines += ["", checksum_line(results[0][1])]
    return lines


def build_8b(bits: float) -> torch.nn.Module:
    """The Llama-3-8B-shaped model with synthetic quantized layers (see the module docstring)."""
    from accelerate import init_empty_weights

    from watersic_hf.integration.replace import set_submodule

    config = AutoConfig.for_model("llama", **LLAMA8B)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for name, param in list(model.named_parameters()):
        if "layers." in name and "norm" not in name:
            continue  # quantized layers are set below
        value = torch.randn(param.shape, generator=g, dtype=torch.float32).mul_(0.02)
        if "norm" in name:
            value = torch.ones(param.shape)
        module_name, _, pname = name.rpartition(".")
        setattr(model.get_submodule(module_name), pname,
                torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False))
    for name, buf in list(model.named_buffers()):
        module_name, _, bname = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if buf.is_meta:
            owner.register_buffer(bname, torch.zeros(buf.shape, dtype=buf.dtype),
                                  persistent=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    templates = {}
    for i, (rel, (n_out, n_in)) in enumerate(BLOCK_LINEARS.items()):
        z = synthetic_codes(n_out, n_in, bits, seed=10 + i)
        p = packing.pack_codes(z)
        meta = validate_layout(p.tensors["weight_perm"], p.tensors["weight_group_meta"],
                               p.layout, n_in, n_out, name=rel)
        zp = z[:, p.tensors["weight_perm"].long()].contiguous()
        templates[rel] = (zp, meta, p)
        print(f"  template {rel}: packed", flush=True)
    layers: dict[str, dict] = {}
    rng = np.random.default_rng(2)
    for b in range(LLAMA8B["num_hidden_layers"]):
        for rel, (zp, meta, p) in templates.items():
            n_out, n_in = zp.shape
            rows = torch.from_numpy(rng.permutation(n_out))
            codes = zp[rows].contiguous().numpy()
            words = pack_with_layout(codes, meta, p.layout, name=rel)
            scales = {"weight_col_scale": torch.full((n_in,), 0.01, dtype=torch.float16),
                      "weight_row_scale": torch.ones(n_out, dtype=torch.float16)}
            tensors = {**words, "weight_perm": p.tensors["weight_perm"].clone(),
                       "weight_group_meta": p.tensors["weight_group_meta"].clone(), **scales}
            name = f"model.layers.{b}.{rel}"
            layer = WaterSICLinear.from_tensors(n_in, n_out, p.layout, tensors, None,
                                                device="cpu")
            layer._weight_view = torch.zeros((), dtype=torch.bfloat16)
            set_submodule(model, name, layer)
            layers[name] = {"in": n_in, "out": n_out, "bias": False, "layout": p.layout,
                            "bits": bits}
    cfg = WaterSICConfig(bits=bits, layers=layers, achieved_bits=bits)
    model.config.quantization_config = cfg
    model.hf_quantizer = WaterSICHfQuantizer(cfg, pre_quantized=True)
    return model


def _saved_8b(tmp: str, with_bf16: bool) -> list[tuple[str, str, float, float | None]] | None:
    """The save records of an earlier run that kept its checkpoints in ``tmp`` (``--keep``)."""
    record = os.path.join(tmp, "saves.json")
    if not os.path.exists(record):
        return None
    with open(record) as f:
        saved = [tuple(row) for row in json.load(f)]
    return saved if with_bf16 or len(saved) == 2 else saved[:2]


def bench_8b(bits: float, tmp: str, with_bf16: bool) -> list[str]:
    n_codes = sum(o * i for o, i in BLOCK_LINEARS.values()) * LLAMA8B["num_hidden_layers"]
    saved = _saved_8b(tmp, with_bf16)
    if saved is None:
        saved = _save_8b(bits, tmp, with_bf16)
    else:
        print("reusing the checkpoints and save times in", tmp, flush=True)
    lines = [f"### Llama-3-8B-shaped model, {n_codes / 1e9:.2f} G quantized weights at "
             f"{bits:g} bits (synthetic codes)", "",
             "| checkpoint | save (s) | save M codes/s per core | load to CPU (s) | "
             "load M codes/s | safetensors (GB) | loaded model (GB) | peak RSS (GB) | "
             "peak RSS ÷ model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, path, wall, cpu in saved:
        load = timed_load(path)
        rate = f"{n_codes / load['wall'] / 1e6:.0f}" if cpu is not None else "—"
        per_core = f"{n_codes / cpu / 1e6:.1f}" if cpu is not None else "—"
        lines.append(
            f"| {label} | {wall:.0f} | {per_core} | {load['wall']:.1f} | {rate} | "
            f"{_folder_bytes(path) / 1e9:.2f} | {load['model_bytes'] / 1e9:.2f} | "
            f"{load['peak_rss'] / 1e9:.2f} | {load['peak_rss'] / load['model_bytes']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", checksum_line(saved[0][1]), checksum_line(saved[1][1])]
    return lines


def _save_8b(bits: float, tmp: str, with_bf16: bool) -> list[tuple[str, str, float, float | None]]:
    """Build the 8B-shaped model, save it (entropy, packed, and bf16 when asked) into ``tmp``,
    and record the save times in ``tmp/saves.json``."""
    t0 = time.perf_counter()
    model = build_8b(bits)
    print(f"built the 8B-shaped model in {time.perf_counter() - t0:.0f} s", flush=True)
    saved: list[tuple[str, str, float, float | None]] = []
    for storage in ("entropy", "packed"):
        path = os.path.join(tmp, f"llama8b-{storage}")
        wall, cpu = _save(model, path, storage)
        print(f"saved {storage} in {wall:.0f} s", flush=True)
        saved.append((f"WaterSIC {storage}", path, wall, cpu))
    del model
    gc.collect()
    if with_bf16:
        path = os.path.join(tmp, "llama8b-bf16")
        dense = build_dense_8b()
        t0 = time.perf_counter()
        dense.save_pretrained(path)
        saved.append(("bf16 (same shapes)", path, time.perf_counter() - t0, None))
        del dense
        gc.collect()
    with open(os.path.join(tmp, "saves.json"), "w") as f:
        json.dump(saved, f)
    return saved


def checksum_line(path: str) -> str:
    """How fast the loader's checksum pass (XXH3-64 of every tensor, over memory-mapped files
    in the page cache) verifies the checkpoint in ``path``."""
    with open(os.path.join(path, "config.json")) as f:
        expected = json.load(f)["quantization_config"]["checksums"]["tensors"]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    verify_safetensors_files(files, expected)  # warm the page cache
    best, hashed = float("inf"), 0
    for _ in range(3):
        t0 = time.perf_counter()
        hashed = verify_safetensors_files(files, expected)
        best = min(best, time.perf_counter() - t0)
    return (f"Checksum pass over `{os.path.basename(path)}` (what every load runs first): "
            f"{hashed / 1e9:.2f} GB in {best:.2f} s, {hashed / best / 1e9:.1f} GB/s on one "
            "thread (best of 3, files in the page cache).")


def build_dense_8b() -> torch.nn.Module:
    config = AutoConfig.for_model("llama", **LLAMA8B)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--only-8b", action="store_true",
                        help="only the 8B-shaped model (its own section, bench_load_8b)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the 16 GB bf16 8B model")
    parser.add_argument("--tmp", default=None, help="folder for the checkpoints")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep the 8B checkpoints in DIR; a later run with the same DIR "
                             "reuses them and their save times and only times the loads again")
    args = parser.parse_args()
    load_avg = os.getloadavg()[0]
    lines = ["## bench_load: checkpoint format v2, save and load", "", machine_line(), "",
             f"Load average at the start: {load_avg:.1f} (2 cores; other jobs shared the "
             "machine when it is above 0)."]
    if args.only_8b:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            lines += [""] + bench_8b(args.bits, args.keep, with_bf16=not args.no_bf16)
        else:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                lines += [""] + bench_8b(args.bits, tmp, with_bf16=not args.no_bf16)
        lines[0] = "## bench_load_8b: checkpoint format v2 at Llama-3-8B scale"
        lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
        update_section("bench_load_8b", "\n".join(lines))
        print("\n".join(lines))
        return
    lines += [""] + bench_layer(args.bits)
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        lines += [""] + bench_smollm2(args.bits, tmp)
        print("\n".join(lines), flush=True)
        if not args.skip_8b:
            lines += [""] + bench_8b(args.bits, tmp, with_bf16=not args.no_bf16)
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
    text = "\n".join(lines)
    print(text)
    update_section("bench_load", text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
