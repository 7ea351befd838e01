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
from .codec import EncodedCodes, encode_codes
from .layout import permuted_codes

__all__ = ["LAYOUT_TENSORS", "code_tensor_names", "encoded_module", "stored_codes"]

LAYOUT_TENSORS = ("weight_perm", "weight_group_meta")
"""Packed-layout tensors that format-2 entropy checkpoints store beside the streams."""


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


def encoded_module(module: nn.Module, name: str) -> EncodedCodes:
    """Entropy-code the codes of one ``WaterSICLinear`` (format v2, :func:`stored_codes` order).

    Cached on the module: the codes are frozen, so a second save or report does not re-encode;
    the cache is keyed on the code tensors' identities and versions.
    """
    params = [getattr(module, n) for n in code_tensor_names(module)]
    key: Any = tuple((p.data_ptr(), p._version) for p in params)
    cached = getattr(module, "_watersic_encoded", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    enc = encode_codes(torch.from_numpy(stored_codes(module)), name=name)
    module._watersic_encoded = (key, enc)
    return enc
