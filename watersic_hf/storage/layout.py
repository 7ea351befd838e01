"""Packing with a stored layout, and validation of packed tensors read from a file.

Format v2 checkpoints store the packed layout that quantization chose (``weight_perm`` and
``weight_group_meta``, see docs/format.md), so loading never searches for widths again: the
codes (decoded in permuted column order) are written straight into the packed words.

* :func:`validate_layout` checks a stored permutation and group table before anything reads
  them (a malformed file must never make a kernel read out of bounds).
* :func:`pack_with_layout` packs on the CPU with compiled loops (``_jit``); it also checks that
  every code fits the stored layout and that the stored escape offsets and largest magnitudes
  match the codes.
* :func:`torch_pack_with_layout` is its plain-torch twin (vectorised, any device): the GPU
  loader's packer and the test oracle.
* :func:`validate_packed` checks a whole packed module (packed storage) including its escape
  counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import packing
from .._numba import lazy_module
from ..packing import _escape_plan, pack_with_layout, permuted_codes

_jit = lazy_module("watersic_hf._packing_jit")  # numba loads on first use (see _numba.py)

__all__ = [
    "pack_with_layout",
    "permuted_codes",
    "torch_pack_with_layout",
    "validate_layout",
    "validate_packed",
]

_M = packing  # field indices META_*


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def validate_layout(
    perm: torch.Tensor, meta: torch.Tensor, layout: dict[str, Any], in_features: int,
    out_features: int, *, name: str,
) -> np.ndarray:
    """Check a stored column permutation and group table against the layout dict.

    Args:
        perm (`torch.Tensor` of shape `(K,)`, int32): ``weight_perm``.
        meta (`torch.Tensor` of shape `(NG, 8)`, int32): ``weight_group_meta``.
        layout (`dict`): the layer's ``layout`` entry (``words``, ``escape_words``,
            ``escape_groups``).
        name (`str`): module name for messages.

    Returns:
        the group table as an int64 NumPy array.

    Raises:
        ValueError: naming the module and what is wrong.
    """
    specs = packing.param_specs(in_features, out_features, layout)
    for pname, value in (("weight_perm", perm), ("weight_group_meta", meta)):
        shape, dtype = specs[pname]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(f"{name}.{pname}: expected {dtype} {shape}, got {value.dtype} "
                             f"{tuple(value.shape)} (malformed checkpoint)")
    p = perm.detach().cpu().numpy().astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= in_features
                   or np.bincount(p, minlength=in_features).max() != 1):
        raise ValueError(f"{name}.weight_perm is not a permutation of 0..{in_features - 1} "
                         "(malformed checkpoint)")
    m = meta.detach().cpu().numpy().astype(np.int64)
    b = m[:, _M.META_WIDTH]
    if np.any((b < 0) | (b > packing.MAX_WIDTH)):
        raise ValueError(f"{name}.weight_group_meta: a group width is outside 0..16")
    offsets = np.cumsum(b) - b
    if not np.array_equal(m[:, _M.META_OFFSET], offsets) or int(b.sum()) != layout["words"]:
        raise ValueError(f"{name}.weight_group_meta: word offsets do not tile weight_packed "
                         f"({layout['words']} words)")
    slots = m[:, _M.META_ESC_SLOT]
    used = slots[slots >= 0]
    if (np.any(slots < -1) or not np.array_equal(used, np.arange(used.size))
            or used.size != layout["escape_groups"]):
        raise ValueError(f"{name}.weight_group_meta: escape slots are not 0..NGE-1 in order "
                         f"({layout['escape_groups']} escape groups)")
    esc = slots >= 0
    e = m[:, _M.META_ESC_WIDTH]
    if np.any(esc & ((e < 0) | (e > 30))) or np.any(esc & (b < 1)):
        raise ValueError(f"{name}.weight_group_meta: an escape width is outside 0..30")
    eoff = m[esc, _M.META_ESC_OFFSET]
    if np.any(np.diff(eoff) < 0) or (eoff.size and (eoff[0] != 0
                                                    or eoff[-1] > layout["escape_words"])):
        raise ValueError(f"{name}.weight_group_meta: escape offsets leave weight_escape_packed "
                         f"({layout['escape_words']} words)")
    bound = packing.MAX_ABS_CODE
    for field in (_M.META_LO, _M.META_ESC_LO, _M.META_MAXABS):
        if np.any(np.abs(m[:, field]) > bound):
            raise ValueError(f"{name}.weight_group_meta: field {field} exceeds ±{bound}")
    return m


def torch_pack_with_layout(
    codes: torch.Tensor, meta: torch.Tensor, layout: dict[str, Any], *, name: str
) -> dict[str, torch.Tensor]:
    """Plain-torch twin of :func:`pack_with_layout` (vectorised; runs on the codes' device).

    Args:
        codes (`torch.Tensor` of shape `(N, K)`, int32): permuted column order.
        meta (`torch.Tensor` of shape `(NG, 8)`, integer): validated group table.

    Returns:
        the same three tensors as :func:`pack_with_layout`, on ``codes.device``.
    """
    device = codes.device
    n_rows, k = codes.shape
    m = meta.to(device=device, dtype=torch.int64)
    n_groups, gs = m.shape[0], packing.DEFAULT_GROUP_SIZE
    n_chunks = _cdiv(n_rows, packing.ESCAPE_CHUNK)
    b, lo, slot = m[:, _M.META_WIDTH], m[:, _M.META_LO], m[:, _M.META_ESC_SLOT]
    has = slot >= 0
    inner = torch.where(has, (1 << b) - 1, 1 << b)
    z = torch.nn.functional.pad(codes.to(torch.int64), (0, n_groups * gs - k))
    z = z.view(n_rows, n_groups, gs)
    valid = (torch.arange(n_groups * gs, device=device) < k).view(1, n_groups, gs)
    z = torch.where(valid, z, lo.view(1, -1, 1))  # padding codes: u = 0
    u = z - lo.view(1, -1, 1)
    outside = (u < 0) | (u >= inner.view(1, -1, 1))
    if bool((outside & ~has.view(1, -1, 1)).any()):
        raise ValueError(f"{name}: {_jit.ERRORS[_jit.E_RANGE]}")
    is_esc = outside & has.view(1, -1, 1)
    u = torch.where(is_esc, inner.view(1, -1, 1), u)
    maxabs = z.abs().amax(dim=(0, 2)) if n_rows else torch.zeros_like(b)
    if not torch.equal(maxabs, m[:, _M.META_MAXABS]):
        raise ValueError(f"{name}.weight_group_meta: the stored largest |code| per group does "
                         "not match the codes (corrupted or crafted file)")
    # main stream: the fields never overlap, so adding them is OR-ing them
    q = torch.arange(gs, device=device)
    bit = q.view(1, gs) * b.view(-1, 1)  # (NG, 32)
    word = (m[:, _M.META_OFFSET].view(-1, 1) + (bit >> 5)).reshape(-1)
    shift = (bit & 31).reshape(-1)
    uu = u.permute(1, 2, 0).reshape(n_groups * gs, n_rows)  # (Kp, N)
    shifted = uu << shift.view(-1, 1)
    words = int(layout["words"])
    packed = torch.zeros(words + 1, n_rows, dtype=torch.int64, device=device)
    has_bits = (b.view(-1, 1) > 0).expand(-1, gs).reshape(-1)
    packed.index_add_(0, torch.where(has_bits, word, words), shifted & 0xFFFFFFFF)
    packed.index_add_(0, torch.where(has_bits, word + 1, words), shifted >> 32)
    packed = packed[:words]
    # escapes: numbered per group in (row, column) order
    counts_full = is_esc.view(n_rows, n_groups, gs).sum(2)  # (N, NG)
    pad_rows = n_chunks * packing.ESCAPE_CHUNK - n_rows
    per_chunk = torch.nn.functional.pad(counts_full, (0, 0, 0, pad_rows))
    per_chunk = per_chunk.view(n_chunks, packing.ESCAPE_CHUNK, n_groups).sum(1).t()  # (NG, NC)
    counts = per_chunk[has]  # slots are in group order
    base = _escape_plan(counts.cpu().numpy(), m.cpu().numpy(), layout, name)
    esc_words = torch.zeros(int(layout["escape_words"]) + 1, dtype=torch.int64, device=device)
    g_idx, r_idx, c_idx = is_esc.permute(1, 0, 2).nonzero(as_tuple=True)
    if g_idx.numel():
        per_group = torch.bincount(g_idx, minlength=n_groups)
        rank = torch.arange(g_idx.numel(), device=device) - (torch.cumsum(per_group, 0)
                                                             - per_group)[g_idx]
        zz = z[r_idx, g_idx, c_idx]
        mg = m[g_idx]
        t = torch.where(zz < mg[:, _M.META_LO], zz - mg[:, _M.META_ESC_LO],
                        zz - mg[:, _M.META_ESC_LO] - inner[g_idx])
        e = mg[:, _M.META_ESC_WIDTH]
        if bool(((t < 0) | (t >= (1 << e))).any()):
            raise ValueError(f"{name}: {_jit.ERRORS[_jit.E_RANGE]}")
        pos = mg[:, _M.META_ESC_OFFSET] * 32 + rank * e
        sh = (t << (pos & 31))
        last = int(layout["escape_words"])
        nz = e > 0
        esc_words.index_add_(0, torch.where(nz, pos >> 5, last), sh & 0xFFFFFFFF)
        esc_words.index_add_(0, torch.where(nz, (pos >> 5) + 1, last), sh >> 32)
    esc_words = esc_words[: int(layout["escape_words"])]

    def as_int32(words64: torch.Tensor) -> torch.Tensor:
        return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)

    return {
        "weight_packed": as_int32(packed),
        "weight_escape_packed": as_int32(esc_words),
        "weight_escape_base": torch.from_numpy(base.astype(np.int32)).to(device),
    }


def validate_packed(
    tensors: dict[str, torch.Tensor], layout: dict[str, Any], in_features: int,
    out_features: int, *, name: str,
) -> None:
    """Check a packed module loaded from a file (packed storage) before any kernel reads it.

    Validates the permutation and group table (:func:`validate_layout`) and that
    ``weight_escape_base`` is exactly the prefix count of the escape markers in
    ``weight_packed``, so that every escape index a kernel computes stays inside its group's
    escape fields.

    Raises:
        ValueError: naming the module and what is wrong.
    """
    meta = validate_layout(tensors["weight_perm"], tensors["weight_group_meta"], layout,
                           in_features, out_features, name=name)
    specs = packing.param_specs(in_features, out_features, layout)
    for pname in ("weight_packed", "weight_escape_packed", "weight_escape_base"):
        shape, dtype = specs[pname]
        value = tensors[pname]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(f"{name}.{pname}: expected {dtype} {shape}, got {value.dtype} "
                             f"{tuple(value.shape)} (malformed checkpoint)")
    n_slots = int(layout["escape_groups"])
    if not n_slots:
        return
    n_chunks = _cdiv(out_features, packing.ESCAPE_CHUNK)
    counts = np.zeros((n_slots, n_chunks), dtype=np.int64)
    packed = np.ascontiguousarray(tensors["weight_packed"].detach().cpu().numpy())
    _jit.count_markers(packed, meta, in_features, counts)
    base = _escape_plan(counts, meta, layout, name)
    stored = tensors["weight_escape_base"].detach().cpu().numpy().astype(np.int64)
    if not np.array_equal(stored, base):
        raise ValueError(f"{name}.weight_escape_base does not match the escape markers in "
                         "weight_packed (corrupted or crafted file)")
