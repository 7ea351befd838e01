"""Perplexity, KL divergence to a reference model, and greedy samples.

Protocol (the same for :func:`perplexity` and :func:`kl_divergence`, so that numbers are
comparable):

1. The text is tokenised **once**, as a whole, with the tokenizer's default settings: a BOS token is
   present only if the tokenizer itself adds one (SmolLM2's does not).
2. The first ``max_tokens`` tokens are kept.
3. They are cut into **non-overlapping windows** of ``seqlen`` tokens; the remainder that does not
   fill a window is dropped. Each window is an independent forward pass (no carried-over context).
4. Inside a window, every token but the first is predicted from the tokens before it, so a window
   contributes ``seqlen - 1`` predictions.
5. Perplexity = ``exp(mean token NLL)`` over all predictions of all windows (in nats). Every window
   has the same length, so this equals the mean of the per-window losses, which is how GPTQ-style
   scripts compute it.

The default text is the 2010-2013 State-of-the-Union addresses
(:func:`watersic_hf.assets.sotu_eval_text`). With SmolLM2-135M in fp32, ``seqlen=512`` and
``max_tokens=4096`` the perplexity is 21.899.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PROTOCOL = (
    "text tokenised once (BOS only if the tokenizer adds it); {first} tokens; "
    "non-overlapping {seqlen}-token windows, remainder dropped; ppl = exp(mean token NLL)"
)


def _protocol(max_tokens: int | None, seqlen: int) -> str:
    first = "all" if max_tokens is None else f"first {max_tokens}"
    return PROTOCOL.format(first=first, seqlen=seqlen)


__all__ = [
    "PROTOCOL",
    "disk_bits",
    "generate_samples",
    "kl_divergence",
    "memory_bits",
    "perplexity",
    "tokenize_windows",
]


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device that inputs must be on: the model's own ``device`` or that of its first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def tokenize_windows(
    tokenizer: Any,
    text: str | None = None,
    *,
    seqlen: int = 512,
    max_tokens: int | None = 4096,
) -> torch.Tensor:
    """Tokenise ``text`` once and cut it into non-overlapping windows (steps 1-3 of the protocol).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): called as ``tokenizer(text)``.
        text (`str`, *optional*): defaults to :func:`watersic_hf.assets.sotu_eval_text`.
        seqlen (`int`, *optional*, defaults to 512): tokens per window (>= 2).
        max_tokens (`int`, *optional*, defaults to 4096): keep only the first ``max_tokens`` tokens;
            ``None`` keeps all of them.

    Returns:
        `torch.LongTensor` of shape ``(n_windows, seqlen)`` on the CPU.

    Raises:
        ValueError: the text is empty or has fewer than ``seqlen`` tokens.
    """
    _check_positive_int("seqlen", seqlen, minimum=2)
    if max_tokens is not None:
        _check_positive_int("max_tokens", max_tokens)
    if text is None:
        from .assets import sotu_eval_text

        text = sotu_eval_text()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}; join a list with '\\n\\n'")
    if not text.strip():
        raise ValueError("text is empty; pass a non-empty evaluation text")
    # verbose=False: the whole text is longer than model_max_length on purpose (it is windowed
    # below).
    ids = tokenizer(text, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    total = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(
            f"the text has only {ids.numel()} tokens (of {total} after max_tokens={max_tokens}), "
            f"fewer than seqlen={seqlen}; pass a longer text or a smaller seqlen"
        )
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def _check_seqlen_fits(model: torch.nn.Module, seqlen: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(
            f"seqlen={seqlen} exceeds the model's max_position_embeddings={limit}; "
            f"pass seqlen<={limit}"
        )


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of shape ``(batch, seqlen, vocab)`` for a batch of windows."""
    out = model(input_ids=input_ids.to(_model_device(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    *,
    seqlen: int = 512,
    max_tokens: int | None = 4096,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Perplexity of a causal LM on ``text`` under the module's protocol (see the module docstring).

    Args:
        model (`PreTrainedModel`): a causal LM returning ``logits`` of shape ``(batch, seqlen,
            vocab)``.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text (`str`, *optional*): defaults to the 2010-2013 SOTU addresses.
        seqlen (`int`, *optional*, defaults to 512): window length in tokens.
        max_tokens (`int`, *optional*, defaults to 4096): only the first ``max_tokens`` tokens are
            used; ``None`` uses the whole text.
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass (does not change the
            result beyond float rounding).

    Returns:
        `dict` with ``ppl`` (float), ``nll`` (mean token NLL in nats), ``bits_per_token`` (``nll /
        ln 2``), ``tokens`` (number of predicted tokens), ``windows``, ``seqlen``, ``max_tokens``,
        ``seconds`` and ``protocol`` (a sentence stating the protocol).
    """
    _check_positive_int("batch_size", batch_size)
    windows = tokenize_windows(tokenizer, text, seqlen=seqlen, max_tokens=max_tokens)
    _check_seqlen_fits(model, seqlen)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum = 0.0
    count = 0
    try:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size]
            logits = _logits(model, batch)
            targets = batch[:, 1:].to(logits.device)
            # Sum in float64 so that the mean does not depend on the batch split.
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            nll_sum += nll.double().sum().item()
            count += nll.numel()
    finally:
        model.train(was_training)
    mean_nll = nll_sum / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "bits_per_token": mean_nll / math.log(2),
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seqlen": seqlen,
        "max_tokens": max_tokens,
        "seconds": time.perf_counter() - start,
        "protocol": _protocol(max_tokens, seqlen),
    }


@torch.inference_mode()
def kl_divergence(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    *,
    seqlen: int = 512,
    max_tokens: int | None = 4096,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Token-averaged KL(P_ref ‖ P_model) of the next-token distributions, in nats and bits.

    Uses the same windows as :func:`perplexity`. At every position of every window (all ``seqlen``
    positions, since each has a next-token distribution), ``KL = Σ_v p_ref(v) (log p_ref(v) - log
    p_model(v))``; the result is the mean over positions. The two models must share the tokenizer
    and vocabulary.

    Args:
        model (`PreTrainedModel`): the model under test (e.g. quantized).
        reference (`PreTrainedModel`): the reference (e.g. the float model); may sit on another
            device.
        tokenizer (`PreTrainedTokenizerBase`): the shared tokenizer.
        text (`str`, *optional*): defaults to the 2010-2013 SOTU addresses.
        seqlen (`int`, *optional*, defaults to 512): window length in tokens.
        max_tokens (`int`, *optional*, defaults to 4096): only the first ``max_tokens`` tokens are
            used.
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass.

    Returns:
        `dict` with ``kl_nats``, ``kl_bits`` (``kl_nats / ln 2``), ``kl_max_nats`` (largest
        per-position value), ``top1_agreement`` (fraction of positions where both argmax tokens
        agree), ``positions``, ``windows``, ``seqlen``, ``max_tokens``, ``seconds`` and
        ``protocol``.

    Raises:
        ValueError: the two models have different vocabulary sizes.
    """
    _check_positive_int("batch_size", batch_size)
    windows = tokenize_windows(tokenizer, text, seqlen=seqlen, max_tokens=max_tokens)
    _check_seqlen_fits(model, seqlen)
    _check_seqlen_fits(reference, seqlen)
    states = (model.training, reference.training)
    model.eval()
    reference.eval()
    start = time.perf_counter()
    kl_sum = 0.0
    kl_max = 0.0
    agree = 0
    count = 0
    try:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size]
            ref_logits = _logits(reference, batch)
            q_logits = _logits(model, batch).to(ref_logits.device)
            if q_logits.shape != ref_logits.shape:
                raise ValueError(
                    f"the models' logits differ in shape: {tuple(q_logits.shape)} vs reference "
                    f"{tuple(ref_logits.shape)}; both models must use the same tokenizer and "
                    "vocabulary"
                )
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            q_logp = F.log_softmax(q_logits, dim=-1)
            # kl_div(input=log q, target=log p, log_target=True) gives p * (log p - log q) per
            # entry.
            kl = F.kl_div(q_logp, ref_logp, reduction="none", log_target=True).sum(-1)
            # Tiny negative values are float rounding of a zero divergence.
            kl = kl.clamp_min(0.0)
            kl_sum += kl.double().sum().item()
            kl_max = max(kl_max, kl.max().item())
            agree += (ref_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
            count += kl.numel()
    finally:
        model.train(states[0])
        reference.train(states[1])
    mean_kl = kl_sum / count
    return {
        "kl_nats": mean_kl,
        "kl_bits": mean_kl / math.log(2),
        "kl_max_nats": kl_max,
        "top1_agreement": agree / count,
        "positions": count,
        "windows": int(windows.shape[0]),
        "seqlen": seqlen,
        "max_tokens": max_tokens,
        "seconds": time.perf_counter() - start,
        "protocol": "KL(P_ref || P_model) averaged over every position; "
        + _protocol(max_tokens, seqlen).rsplit(";", 1)[0],
    }


@torch.inference_mode()
def generate_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy continuations of ``prompts``, one prompt at a time (no padding effects).

    Args:
        model (`PreTrainedModel`): a causal LM with ``generate``.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        prompts (`Sequence[str]`): the prompts.
        max_new_tokens (`int`, *optional*, defaults to 32): tokens generated per prompt.

    Returns:
        `list[str]`: the generated continuation of each prompt (prompt not included), decoded with
        special tokens skipped.
    """
    if isinstance(prompts, str):
        raise TypeError(
            "prompts must be a sequence of strings, got a single str; wrap it in a list"
        )
    _check_positive_int("max_new_tokens", max_new_tokens)
    device = _model_device(model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    outputs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        input_ids = enc["input_ids"].to(device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        outputs.append(
            tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True)
        )
    return outputs


def _safetensors_entries(path: Any) -> dict[str, tuple[str, int]]:
    """Tensor name → (dtype, stored bytes), read from a ``.safetensors`` header only."""
    import json
    import struct

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return {
        name: (meta["dtype"], meta["data_offsets"][1] - meta["data_offsets"][0])
        for name, meta in header.items()
    }


def _layer_weight_count(meta: Any) -> int | None:
    n_in = meta.get("in", meta.get("in_features")) if isinstance(meta, dict) else None
    n_out = meta.get("out", meta.get("out_features")) if isinstance(meta, dict) else None
    return n_in * n_out if isinstance(n_in, int) and isinstance(n_out, int) else None


def disk_bits(save_dir: Any, layers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bits per weight that the quantized layers take in a checkpoint's ``.safetensors`` files.

    Counts the bytes of every stored tensor of each quantized module except its ``bias`` (headers
    excluded), and divides ``8 × bytes`` by the layers' weight count ``Σ in·out``.

    Args:
        save_dir (`str` or `PathLike`): a folder written by ``save_pretrained``.
        layers (`dict[str, dict]`, *optional*): per-module metadata with ``in``/``out``; defaults to
            ``config.json["quantization_config"]["layers"]`` of the folder.

    Returns:
        `dict` with ``bits_per_weight`` (``None`` without quantized layers), ``layer_bytes``,
        ``weights``, ``file_bytes`` (all ``.safetensors`` files, headers included) and
        ``total_bytes`` (every file of the folder).
    """
    import json
    import pathlib

    folder = pathlib.Path(save_dir)
    if layers is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        layers = (config.get("quantization_config") or {}).get("layers") or {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{str(folder)!r} holds no .safetensors files; pass a folder written by save_pretrained"
        )
    layer_bytes = 0
    for file in files:
        for name, (_, nbytes) in _safetensors_entries(file).items():
            module, _, tensor = name.rpartition(".")
            if module in layers and tensor != "bias":
                layer_bytes += nbytes
    counts = [_layer_weight_count(m) for m in layers.values()]
    if None in counts:
        raise ValueError("the layer metadata lacks 'in'/'out' sizes; cannot count weights")
    weights = sum(counts)
    return {
        "bits_per_weight": 8.0 * layer_bytes / weights if weights else None,
        "layer_bytes": layer_bytes,
        "weights": weights,
        "file_bytes": sum(f.stat().st_size for f in files),
        "total_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    }


def memory_bits(model: torch.nn.Module, layers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bits per weight that the quantized layers of a loaded model occupy in memory.

    Counts every parameter and buffer of each quantized module except ``bias`` (so caches the module
    keeps count too), over the weight count ``Σ in·out``.

    Args:
        model (`PreTrainedModel`): a quantized model.
        layers (`dict[str, dict]`, *optional*): defaults to
            ``model.config.quantization_config.layers``.

    Returns:
        `dict` with ``bits_per_weight`` (``None`` without quantized layers), ``layer_bytes`` and
        ``weights``.
    """
    if layers is None:
        qc = getattr(model.config, "quantization_config", None)
        layers = (qc.get("layers") if isinstance(qc, dict) else getattr(qc, "layers", None)) or {}
    layer_bytes = 0
    weights = 0
    for name, meta in layers.items():
        module = model.get_submodule(name)
        tensors = [
            t for n, t in module.named_parameters(recurse=True) if n.rpartition(".")[2] != "bias"
        ]
        tensors += [
            t for n, t in module.named_buffers(recurse=True) if n.rpartition(".")[2] != "bias"
        ]
        layer_bytes += sum(t.numel() * t.element_size() for t in tensors)
        count = _layer_weight_count(meta)
        if count is None:
            count = int(module.in_features) * int(module.out_features)
        weights += count
    return {
        "bits_per_weight": 8.0 * layer_bytes / weights if weights else None,
        "layer_bytes": layer_bytes,
        "weights": weights,
    }
