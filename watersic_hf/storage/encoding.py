"""The codes of a ``WaterSICLinear`` as the checkpoint stores them, and their entropy coding.

Used by the checkpoint writer (:mod:`.checkpoint`) and by :func:`watersic_hf.report`; it imports
neither, so the dependency between the two stays one-way (checkpoint → report → encoding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .. import packing
from .._numba import lazy_module
from .codec import EncodedCodes, encode_codes
from .layout import permuted_codes

_jit = lazy_module("watersic_hf.storage._jit")  # numba loads on first use (see _numba.py)

__all__ = [
    "LAYOUT_TENSORS",
    "code_statistics",
    "stored_layout_nbytes",
    "stored_perm_dtype",
    "code_tensor_names",
    "encoded_module",
    "prepare_layer",
    "stored_codes",
]

LAYOUT_TENSORS = ("weight_perm", "weight_group_meta")
"""Packed-layout tensors that format-2 entropy checkpoints store beside the streams."""


def stored_perm_dtype(in_features: int) -> torch.dtype:
    """dtype of ``weight_perm`` in an entropy checkpoint: int16 when every column index fits
    (halves its cost, 16/N bits per weight), else int32 as in memory."""
    return torch.int16 if in_features <= 2**15 else torch.int32


def stored_layout_nbytes(module: nn.Module) -> int:
    """Bytes of the layout tensors an entropy checkpoint stores for ``module`` (0 if plain)."""
    if module.format != "packed":
        return 0
    perm = module.in_features * stored_perm_dtype(module.in_features).itemsize
    return perm + module.weight_group_meta.numel() * 4


def code_tensor_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of a ``WaterSICLinear`` that hold its codes (not the scales)."""
    if module.format == "plain":
        return ("weight_codes",)
    return tuple(packing.CODE_TENSOR_NAMES)


def stored_codes(module: nn.Module) -> np.ndarray:
    """The code matrix in the column order a format-v2 stream stores it, ``(N, K)`` int32.

    Packed modules: permuted column order (``weight_perm``), so that a loader packs the decoded
    codes without a permutation; plain modules: the original order.
    """
    if module.format == "plain":
        return np.ascontiguousarray(module.weight_codes.detach().cpu().numpy())
    tensors = {n: getattr(module, n) for n in packing.CODE_TENSOR_NAMES}
    return permuted_codes(tensors, module.in_features, module.out_features)


def _key(module: nn.Module) -> Any:
    # the codes are frozen: identities and versions of the code tensors identify them
    return tuple((p.data_ptr(), p._version) for p in
                 (getattr(module, n) for n in code_tensor_names(module)))


def _cached(module: nn.Module, attr: str, compute: Any, codes: np.ndarray | None) -> Any:
    key = _key(module)
    cached = getattr(module, attr, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = compute(stored_codes(module) if codes is None else codes)
    setattr(module, attr, (key, value))
    return value


def encoded_module(module: nn.Module, name: str, codes: np.ndarray | None = None
                   ) -> EncodedCodes:
    """Entropy-code the codes of one ``WaterSICLinear`` (format v2, :func:`stored_codes` order),
    cached on the module. ``codes`` may pass the layer's :func:`stored_codes` when the caller
    already has them."""
    return _cached(module, "_watersic_encoded",
                   lambda z: encode_codes(torch.from_numpy(z), name=name), codes)


def code_statistics(module: nn.Module, n_dead: int, codes: np.ndarray | None = None
                    ) -> tuple[float, float, int]:
    """Entropy statistics of a layer's codes (compiled; invariant to the column order), cached
    on the module.

    Args:
        n_dead (`int`): the layer's dead-column count; when positive, all-zero columns are left
            out of the pooled entropy (the algorithm's rate does not count them).
        codes: the layer's :func:`stored_codes`, when the caller already has them.

    Returns:
        ``(pooled, per_column, n_live)``: pooled plug-in entropy (bits per code) over the live
        columns, mean per-column plug-in entropy over all columns, and the live column count.
    """

    def compute(z: np.ndarray) -> tuple[float, float, int]:
        live = np.ones(z.shape[1], dtype=np.bool_)
        if n_dead > 0:
            nonzero = z.any(axis=0)
            live = nonzero if nonzero.any() else live
        pooled, per_col = _jit.code_statistics(z, live)
        return float(pooled), float(per_col), int(live.sum())

    return _cached(module, "_watersic_stats", compute, codes)


def prepare_layer(module: nn.Module, name: str, n_dead: int, *, entropy: bool) -> None:
    """Fill both caches (stream when ``entropy``, statistics) from one unpacking of the layer,
    so a save never holds more than one layer's decoded codes."""
    key = _key(module)
    stale = [a for a in (("_watersic_encoded",) if entropy else ()) + ("_watersic_stats",)
             if getattr(module, a, None) is None or getattr(module, a)[0] != key]
    if not stale:
        return
    codes = stored_codes(module)
    if entropy:
        encoded_module(module, name, codes)
    code_statistics(module, n_dead, codes)
