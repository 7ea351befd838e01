"""Calibration data: normalise what the user gave into equal-length windows of token ids.

Accepted forms of ``WaterSICConfig.dataset``:

* ``None`` — the shipped corpus, :func:`watersic_hf.assets.default_calibration_texts`;
* a list of texts; a path to a ``.txt`` file; a path to a folder of ``.txt`` files;
* a list of token-id sequences (lists, 1-D tensors, ``(1, T)`` tensors or ``{"input_ids": ...}``
  dicts): each one is a sample, truncated to ``seqlen``;
* ``"wikitext2"`` / ``"c4"``: delegated to ``optimum.gptq.data.get_dataset`` (needs ``optimum`` and
  ``datasets`` plus the network).

Texts are "concatenated then chunked", as the official WaterSIC code does: the documents are
shuffled with the seed, joined with a blank line, tokenised (only as many documents as needed) and
cut into ``nsamples`` non-overlapping windows of ``seqlen`` tokens. The tokenizer's own prefix (e.g.
BOS) is put once at the start of the stream.
"""

from __future__ import annotations

import logging
import os
import pathlib
import random
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

NAMED_DATASETS = ("wikitext2", "c4", "c4-new")
_DATASETS_HINT = "pip install 'watersic-hf[datasets]'"
_SEPARATOR = "\n\n"

__all__ = [
    "NAMED_DATASETS",
    "calibration_tokenizer",
    "calibration_windows",
    "describe_dataset",
    "load_tokenizer",
    "make_batches",
    "reads_text",
]


def load_tokenizer(tokenizer: Any, model: Any = None) -> Any:
    """Resolve the calibration tokenizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`, `str` or `None`): an object (returned as is), a path
            or hub name, or ``None`` to use the model's own folder (``model.config._name_or_path``).
        model (`PreTrainedModel`, *optional*): the model being quantized.

    Raises:
        ValueError: no tokenizer was given and none can be found next to the model.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer
    if source is None and model is not None:
        source = getattr(model.config, "_name_or_path", None) or getattr(
            model, "name_or_path", None
        )
    if not source:
        raise ValueError(
            "WaterSIC calibration needs a tokenizer for text data and none was found: pass "
            "WaterSICConfig(tokenizer=...) (an object or a path), or pass token ids as the dataset"
        )
    try:
        return AutoTokenizer.from_pretrained(str(source))
    # transformers raises OSError, ValueError, ... depending on what is missing.
    except Exception as err:
        raise ValueError(
            f"WaterSIC could not load a tokenizer from {str(source)!r} ({type(err).__name__}: "
            f"{err}); pass WaterSICConfig(tokenizer=...) with a tokenizer object or a folder that "
            "contains one"
        ) from err


def reads_text(dataset: Any) -> bool:
    """Whether calibration tokenizes ``dataset`` (texts, a path, a dataset name, or ``None`` for
    the shipped corpus) rather than taking it as token ids."""
    if dataset is None or isinstance(dataset, (str, os.PathLike)):
        return True
    if isinstance(dataset, Sequence) and not isinstance(dataset, torch.Tensor) and dataset:
        return all(isinstance(d, str) for d in dataset)
    return False


def calibration_tokenizer(tokenizer: Any, dataset: Any, method: str, model: Any = None) -> Any:
    """The tokenizer calibration will use, loaded once, or ``None`` when it uses none.

    A tokenizer given as an object or a path is always returned (loaded); without one, the model's
    own tokenizer is loaded when calibration reads text (see :func:`reads_text`; ``"rtn"`` reads no
    data). The quantizer passes the result to calibration and saves it with the model.

    Raises:
        ValueError: text calibration but no tokenizer can be loaded (see :func:`load_tokenizer`).
    """
    if tokenizer is None and (method == "rtn" or not reads_text(dataset)):
        return None
    return load_tokenizer(tokenizer, model)


def describe_dataset(dataset: Any) -> str:
    """``WaterSICConfig.dataset`` in words, for config.json and the model card (texts and token
    ids themselves are never stored; a path is reduced to its last component)."""
    if dataset is None:
        return "the State-of-the-Union corpus shipped with watersic_hf (83 addresses, 1934-1999)"
    if isinstance(dataset, (str, os.PathLike)):
        name = str(dataset)
        if name in NAMED_DATASETS:
            return f"`{name}`"
        return f"the local text `{os.path.basename(os.path.normpath(name))}`"
    count = len(dataset) if hasattr(dataset, "__len__") else 0
    if reads_text(dataset):
        return f"{count} user-supplied texts"
    return f"{count} user-supplied token-id samples"


def _read_text_path(path: pathlib.Path) -> list[str]:
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    files = sorted(path.glob("*.txt"))
    if not files:
        raise ValueError(
            f"the calibration folder {str(path)!r} holds no .txt files; add some or pass texts"
        )
    return [f.read_text(encoding="utf-8") for f in files]


def _named_dataset(
    name: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int
) -> list[torch.Tensor]:
    try:
        import datasets  # noqa: F401  (optimum only fails later, deep inside, without it)
        from optimum.gptq.data import get_dataset
    except ImportError as err:
        raise ValueError(
            f"the calibration dataset {name!r} is downloaded through optimum and datasets, which "
            f"are not installed ({err}); run `{_DATASETS_HINT}`, or pass a list of texts / a .txt "
            "path instead"
        ) from err
    try:
        examples = get_dataset(name, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    except Exception as err:  # network or hub failures come in many types
        raise ValueError(
            f"could not fetch the calibration dataset {name!r} ({type(err).__name__}: {err}); it "
            "needs network access to the Hugging Face Hub. Pass a list of texts or a .txt path "
            "instead"
        ) from err
    return [torch.as_tensor(e["input_ids"]).reshape(-1)[:seqlen].long() for e in examples]


def _as_ids(item: Any) -> torch.Tensor | None:
    """Token ids of one pre-tokenised sample, or None if ``item`` is not token ids."""
    if isinstance(item, dict):
        if "input_ids" not in item:
            return None
        mask = item.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError(
                "WaterSIC calibration does not take padded samples (attention_mask has zeros); "
                "pass unpadded token ids or texts"
            )
        item = item["input_ids"]
    if isinstance(item, torch.Tensor):
        if item.is_floating_point() or item.is_complex():
            raise TypeError(f"calibration token ids must be integers, got a {item.dtype} tensor")
        if item.dim() == 2 and item.shape[0] == 1:
            item = item[0]
        if item.dim() != 1:
            raise ValueError(
                f"a calibration sample must be a 1-D sequence of ids, got shape {tuple(item.shape)}"
            )
        return item.long()
    if isinstance(item, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in item
    ):
        return torch.tensor(item, dtype=torch.long)
    return None


def _tokenize_stream(
    texts: Sequence[str], tokenizer: Any, needed: int, seed: int
) -> tuple[torch.Tensor, int]:
    """Shuffle the documents, then tokenise them in order until ``needed`` tokens are reached."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    sep = tokenizer(_SEPARATOR, add_special_tokens=False)["input_ids"]
    pieces: list[int] = list(prefix)
    used = 0
    for idx in order:
        text = texts[idx]
        if not text.strip():
            continue
        if used:
            pieces.extend(sep)
        pieces.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used += 1
        if len(pieces) >= needed:
            break
    return torch.tensor(pieces, dtype=torch.long), used


def calibration_windows(
    dataset: Any,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    model: Any = None,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Turn ``WaterSICConfig.dataset`` into calibration samples.

    Args:
        dataset: see the module docstring.
        tokenizer: object, path or ``None`` (see :func:`load_tokenizer`); unused for token ids.
        nsamples (`int`): number of windows wanted.
        seqlen (`int`): tokens per window.
        seed (`int`, *optional*, defaults to 0): document shuffling seed.
        model (`PreTrainedModel`, *optional*): used to find the tokenizer when ``tokenizer`` is
            None.
        vocab_size (`int`, *optional*): when given, ids outside ``[0, vocab_size)`` raise an error.

    Returns:
        list of `torch.LongTensor` of shape ``(T,)`` on the CPU; ``T == seqlen`` for texts (shorter,
        with a warning, when the whole text has fewer than ``seqlen`` tokens).

    Raises:
        ValueError: empty or missing data, unknown dataset name, tokenizer not found.
        TypeError: a dataset of an unsupported type.
    """
    if dataset is None:
        from ..assets import default_calibration_texts

        dataset = list(default_calibration_texts())
    texts: list[str] | None = None
    samples: list[torch.Tensor] | None = None
    if isinstance(dataset, (str, os.PathLike)):
        name = str(dataset)
        if name in NAMED_DATASETS:
            samples = _named_dataset(name, load_tokenizer(tokenizer, model), nsamples, seqlen, seed)
        elif os.path.exists(name):
            texts = _read_text_path(pathlib.Path(name))
        else:
            raise ValueError(
                f"WaterSICConfig.dataset={name!r} is neither an existing path nor one of "
                f"{NAMED_DATASETS}; pass a list of texts, a .txt file or folder, or token ids"
            )
    elif isinstance(dataset, Sequence) or isinstance(dataset, torch.Tensor):
        if isinstance(dataset, torch.Tensor) and dataset.dim() == 2:
            dataset = list(dataset)
        if len(dataset) == 0:
            raise ValueError(
                "WaterSICConfig.dataset is empty; pass at least one text or token sequence"
            )
        if all(isinstance(d, str) for d in dataset):
            texts = list(dataset)
        else:
            ids = [_as_ids(d) for d in dataset]
            if any(i is None for i in ids):
                bad = next(d for d, i in zip(dataset, ids, strict=True) if i is None)
                raise TypeError(
                    "WaterSICConfig.dataset must hold only texts or only token-id sequences, got "
                    f"an item of type {type(bad).__name__}"
                )
            samples = [i[:seqlen] for i in ids if i.numel() > 0][:nsamples]
    else:
        raise TypeError(
            f"WaterSICConfig.dataset of type {type(dataset).__name__} is not supported; pass a "
            "list of texts, a path, a dataset name or token ids"
        )

    if texts is not None:
        if not any(t.strip() for t in texts):
            raise ValueError(
                "the calibration texts are empty; pass non-empty texts or leave dataset=None"
            )
        tok = load_tokenizer(tokenizer, model)
        stream, used = _tokenize_stream(texts, tok, nsamples * seqlen, seed)
        if stream.numel() < 2:
            raise ValueError(
                "the calibration texts tokenise to fewer than 2 tokens; pass longer texts"
            )
        if stream.numel() < seqlen:
            logger.warning(
                "the calibration texts hold only %d tokens, fewer than seqlen=%d: calibrating on "
                "one shorter window; pass more text (or lower seqlen) for a better calibration",
                stream.numel(),
                seqlen,
            )
            samples = [stream]
        else:
            count = min(nsamples, stream.numel() // seqlen)
            if count < nsamples:
                logger.warning(
                    "the calibration texts give only %d windows of %d tokens (nsamples=%d "
                    "asked); pass more text or lower nsamples/seqlen",
                    count,
                    seqlen,
                    nsamples,
                )
            samples = [stream[i * seqlen : (i + 1) * seqlen] for i in range(count)]
        logger.info(
            "calibration: %d windows of %d tokens from %d documents",
            len(samples),
            samples[0].numel(),
            used,
        )

    assert samples is not None
    if not samples:
        raise ValueError("WaterSICConfig.dataset gives no calibration samples; pass non-empty data")
    if vocab_size is not None:
        top = max(int(s.max()) for s in samples)
        low = min(int(s.min()) for s in samples)
        if low < 0 or top >= vocab_size:
            raise ValueError(
                f"calibration token ids lie in [{low}, {top}] but the model's vocabulary has "
                f"{vocab_size} entries; tokenize with the model's own tokenizer"
            )
    return samples


def make_batches(samples: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack samples into batches of at most ``batch_size``, only ever stacking equal lengths.

    Returns:
        list of `torch.LongTensor` of shape ``(B, T)``.
    """
    batches: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    for s in samples:
        if current and (len(current) == batch_size or current[0].numel() != s.numel()):
            batches.append(torch.stack(current))
            current = []
        current.append(s)
    if current:
        batches.append(torch.stack(current))
    return batches
