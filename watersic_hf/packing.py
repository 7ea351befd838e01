"""Packed in-memory format of WaterSIC integer codes (format ``"packed"``, version 1).

WaterSIC gives every input column its own code range (waterfilling), so one bit width per
matrix wastes bits. This module stores codes with a width per group of 32 columns, after
permuting the columns so that columns of similar spread share a group, and moves each group's
rare out-of-range codes to an escape stream so that the width follows the bulk of the group.
Every code is reproduced exactly; nothing is ever clipped.

Notation: ``N = out_features`` (rows), ``K = in_features`` (columns), ``G = 32`` columns per
group, ``NG = ceil(K / G)`` groups, ``NC = ceil(N / 32)`` row chunks.

Tensors (all int32; see docs/format.md, "Packed layout", for the normative description):

* ``weight_perm`` `(K,)`: permuted position ``p`` holds original column ``perm[p]``. Group ``g``
  covers positions ``[g·G, g·G + G)``; positions ``>= K`` of the last group are padding.
* ``weight_group_meta`` `(NG, 8)`: per group ``[width b, word offset, lo, escape slot (-1 = no
  escapes), escape width e, escape lo, escape word offset, max |code|]``.
* ``weight_packed`` `(W, N)`, ``W = Σ_g b_g``: for row ``n`` of group ``g`` the 32 unsigned values
  ``u_0..u_31`` (``b`` bits each) form the little-endian integer ``U = Σ_k u_k · 2^(k·b)``, whose
  ``b`` 32-bit words sit at rows ``offset_g .. offset_g + b - 1`` of column ``n``. Storing words
  K-major and rows contiguous makes a kernel's loads for a block of output rows coalesced.
* Decoding: with no escape slot, ``code = lo + u``. With one, ``u = 2^b - 1`` is a marker: the
  code is the group's next escape value (escapes are numbered in (row, column) order within the
  group); all other ``u`` give ``code = lo + u``.
* ``weight_escape_packed`` `(WE,)`: group ``g``'s escape values ``t_i`` as ``e``-bit fields
  ``[i·e, i·e + e)`` of the little-endian bit stream starting at word ``escape_offset_g``.
  ``z = escape_lo + t``; the code is ``z`` if ``z < lo`` and ``z + 2^b - 1`` otherwise (the
  inner range is skipped, which saves escape bits).
* ``weight_escape_base`` `(NGE, NC)`: for escape slot ``s`` and row chunk ``c``, the number of the
  group's escapes in rows ``< 32·c``, so that a kernel working on a block of rows can number
  its escapes with a prefix sum of the markers it sees.

Packing is deterministic: the same codes give byte-identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._numba import lazy_module

_jit = lazy_module("watersic_hf._packing_jit")  # numba loads on first use (see _numba.py)

__all__ = [
    "CODE_TENSOR_NAMES",
    "DEFAULT_GROUP_SIZE",
    "ESCAPE_CHUNK",
    "FORMAT_VERSION",
    "MAX_ABS_CODE",
    "MAX_WIDTH",
    "PackedCodes",
    "pack_codes",
    "pack_with_layout",
    "permuted_codes",
    "param_specs",
    "unpack_codes",
]

FORMAT_VERSION = 1
DEFAULT_GROUP_SIZE = 32
ESCAPE_CHUNK = 32
MAX_WIDTH = 16  # main-stream width cap; wider spreads go through escapes
MAX_ABS_CODE = 2**29 - 1  # keeps every escape field within 30 bits and all index math in int32
META_FIELDS = 8
META_WIDTH, META_OFFSET, META_LO, META_ESC_SLOT = 0, 1, 2, 3
META_ESC_WIDTH, META_ESC_LO, META_ESC_OFFSET, META_MAXABS = 4, 5, 6, 7

CODE_TENSOR_NAMES = (
    "weight_packed",
    "weight_group_meta",
    "weight_perm",
    "weight_escape_packed",
    "weight_escape_base",
)
_LAYOUT_INT_KEYS = (
    "version", "group_size", "escape_chunk", "words", "escape_words", "escape_groups"
)


@dataclass
class PackedCodes:
    """Result of `pack_codes`.

    Attributes:
        layout (`dict`): JSON-able description (see `param_specs`).
        tensors (`dict[str, torch.Tensor]`): the five code tensors of `CODE_TENSOR_NAMES`.
    """

    layout: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_layout(layout: dict[str, Any]) -> None:
    if layout.get("format") != "packed":
        raise ValueError(f"layout['format']={layout.get('format')!r}; expected 'packed'.")
    for key in _LAYOUT_INT_KEYS:
        value = layout.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"layout[{key!r}]={value!r} must be a non-negative int; pass the dict returned by "
                "WaterSICLinear.layout_metadata()."
            )
    if layout["version"] != FORMAT_VERSION:
        raise ValueError(
            f"layout['version']={layout['version']} is not supported by this watersic_hf "
            f"(format version {FORMAT_VERSION}); upgrade watersic_hf."
        )
    if layout["group_size"] != DEFAULT_GROUP_SIZE or layout["escape_chunk"] != ESCAPE_CHUNK:
        raise ValueError(
            f"layout group_size={layout['group_size']} / escape_chunk={layout['escape_chunk']}: "
            f"format version {FORMAT_VERSION} needs {DEFAULT_GROUP_SIZE} / {ESCAPE_CHUNK}."
        )


def param_specs(
    in_features: int, out_features: int, layout: dict[str, Any]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of every weight parameter of a ``"packed"`` `WaterSICLinear`.

    Args:
        in_features (`int`): ``K``.
        out_features (`int`): ``N``.
        layout (`dict`): ``{"format": "packed", "version", "group_size", "escape_chunk",
            "words", "escape_words", "escape_groups"}``.

    Returns:
        `dict` mapping parameter name to ``(shape, dtype)``.
    """
    _check_layout(layout)
    n_groups = _cdiv(in_features, layout["group_size"])
    n_chunks = _cdiv(out_features, layout["escape_chunk"])
    return {
        "weight_packed": ((layout["words"], out_features), torch.int32),
        "weight_group_meta": ((n_groups, META_FIELDS), torch.int32),
        "weight_perm": ((in_features,), torch.int32),
        "weight_escape_packed": ((layout["escape_words"],), torch.int32),
        "weight_escape_base": ((layout["escape_groups"], n_chunks), torch.int32),
        "weight_col_scale": ((in_features,), torch.float16),
        "weight_row_scale": ((out_features,), torch.float16),
    }


# ---------------------------------------------------------------------------- bit streams
def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) → int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack each row of ``values`` (R, C) int64 in [0, 2^width) into ``ceil(C·width/32)`` words.

    Value ``i`` of a row occupies bits ``[i·width, (i+1)·width)`` of the row's little-endian
    bit stream; word ``j`` holds bits ``[32j, 32j + 32)``.

    Returns:
        `torch.Tensor` of shape `(R, ceil(C·width/32))`, int32.
    """
    rows, cols = values.shape
    n_words = _cdiv(cols * width, 32)
    if n_words == 0:
        return torch.zeros(rows, 0, dtype=torch.int32, device=values.device)
    shifts = torch.arange(width, device=values.device)
    bits = ((values[:, :, None] >> shifts) & 1).reshape(rows, cols * width)  # (R, C·width)
    bits = torch.nn.functional.pad(bits, (0, n_words * 32 - cols * width))
    weights = torch.ones(32, dtype=torch.int64, device=values.device) << torch.arange(
        32, device=values.device
    )
    words = (bits.view(rows, n_words, 32) * weights).sum(-1)  # (R, n_words) in [0, 2^32)
    return _to_int32_words(words)


def _extract(words: torch.Tensor, bitpos: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Read ``width``-bit fields at absolute bit positions from a 1-D int32 word stream.

    Args:
        words (`torch.Tensor` of shape `(L,)`, int32).
        bitpos (`torch.Tensor`, int64): bit positions, any shape.
        width (`torch.Tensor`, int64): field widths (0..30), broadcastable to ``bitpos``.

    Returns:
        `torch.Tensor`, int64 in ``[0, 2^width)``; 0 where ``width == 0``.
    """
    if words.numel() == 0:
        return torch.zeros_like(bitpos)
    last = words.numel() - 1
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    j0 = bitpos >> 5
    lo_word = w64[j0.clamp(0, last)]
    hi_word = w64[(j0 + 1).clamp(0, last)]
    both = lo_word | (hi_word << 32)
    field = (both >> (bitpos & 31)) & ((torch.ones_like(width) << width) - 1)
    return torch.where(width > 0, field, torch.zeros_like(field))


# ---------------------------------------------------------------------------- packing
def _column_order(codes: torch.Tensor, clamp: int = 4096) -> torch.Tensor:
    """Permutation sorting columns by the entropy of their codes (stable, integer keys).

    Columns of similar spread end up in the same group, so one width fits the whole group.
    Histograms use ``bincount`` on codes clamped to ``±clamp`` (only the key of extreme outlier
    columns is affected, and they sort last either way). The entropy is rounded to 1/1024 bit so
    that the order does not depend on the last ulp of ``log2`` on a given machine.

    Returns:
        `torch.Tensor` of shape `(K,)`, int64.
    """
    n_rows, n_cols = codes.shape
    clamped = codes.clamp(-clamp, clamp)
    low = int(clamped.min())
    bins = int(clamped.max()) - low + 1  # histogram only the range that occurs
    chunk = max(1, (1 << 23) // bins)
    keys = []
    for start in range(0, n_cols, chunk):
        block = clamped[:, start : start + chunk].long() - low  # (N, C), in [0, bins)
        cols = block.shape[1]
        flat = (block + torch.arange(cols, device=codes.device) * bins).flatten()
        p = torch.bincount(flat, minlength=cols * bins).view(cols, bins).double() / n_rows
        ent = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)
        keys.append(torch.round(ent * 1024).to(torch.int64))
    return torch.sort(torch.cat(keys), stable=True).indices


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits needed for non-negative int64 values (0 → 0)."""
    out = torch.zeros_like(x)
    v = x.clone()
    while bool((v > 0).any()):
        out += (v > 0).to(out.dtype)
        v = v >> 1
    return out


def _choose_group(vals: torch.Tensor, n_chunks: int) -> tuple[int, int, bool]:
    """Width, base and escape mode minimising the group's bits.

    Cost model (bits): ``b·n`` for the main stream; with escapes, ``e`` bits per escape, where
    ``e`` covers the largest escape field, plus ``32·NC`` for the row-chunk counts. Ties go to
    the smaller width, then the smaller ``lo``.

    Args:
        vals (`torch.Tensor` of shape `(n,)`, int64): the group's codes (padding excluded).
        n_chunks (`int`): ``NC``.

    Returns:
        ``(b, lo, uses_escapes)``.
    """
    n = vals.numel()
    vmin, vmax = int(vals.min()), int(vals.max())
    if vmax - vmin < 1 << 22:  # a histogram is much cheaper than sorting
        hist = torch.bincount(vals - vmin, minlength=vmax - vmin + 1)
        uniq = torch.nonzero(hist).flatten()
        counts = hist[uniq]
        uniq = uniq + vmin
    else:
        uniq, counts = torch.unique(vals, return_counts=True)
    full = int(_bit_length(torch.tensor([vmax - vmin]))[0])
    best: tuple[int, int, int, bool] | None = None
    if full <= MAX_WIDTH:
        best = (full * n, full, vmin, False)
    cum = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    idx = torch.arange(uniq.numel(), device=uniq.device)
    for b in range(1, min(MAX_WIDTH, full) + 1):
        inner = (1 << b) - 1
        j = torch.searchsorted(uniq, uniq + inner - 1, right=True)
        n_esc = n - (cum[j] - cum[idx])
        below = torch.where(idx > 0, uniq[(idx - 1).clamp(min=0)] - vmin, torch.zeros_like(uniq))
        above = torch.where(j < uniq.numel(), torch.full_like(uniq, vmax - vmin - inner), below)
        e = _bit_length(torch.maximum(below, above))
        cost = b * n + e * n_esc + 32 * n_chunks
        cost = torch.where(n_esc > 0, cost, torch.full_like(cost, torch.iinfo(torch.int64).max))
        i = int(torch.argmin(cost))
        if int(n_esc[i]) > 0 and (best is None or int(cost[i]) < best[0]):
            best = (int(cost[i]), b, int(uniq[i]), True)
    assert best is not None  # full <= MAX_WIDTH or some b gives a finite escape cost
    return best[1], best[2], best[3]


def pack_codes(codes: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> PackedCodes:
    """Pack integer codes into the ``"packed"`` format.

    The column order is computed with torch; every group's width search and the packing run in
    compiled loops (``_packing_jit``), in parallel over groups and row chunks. The result is
    byte-identical to :func:`_pack_codes_reference`, the plain-torch twin.

    Args:
        codes (`torch.Tensor` of shape `(N, K)`, integer): codes with ``|code| <= 2^29 - 1``.
        group_size (`int`, *optional*, defaults to 32): columns per width group (only 32 in
            format version 1).

    Returns:
        `PackedCodes` with tensors on the device of ``codes``.

    Raises:
        ValueError: bad shape or group size, or a code outside ``±(2^29 - 1)``.
    """
    _check_codes(codes, group_size)
    device = codes.device
    codes = codes.to(torch.int32)
    n_rows, n_cols = codes.shape
    n_groups = _cdiv(n_cols, group_size)
    n_chunks = _cdiv(n_rows, ESCAPE_CHUNK)
    perm = _column_order(codes)
    zp = np.ascontiguousarray(codes[:, perm].cpu().numpy())
    meta = np.zeros((n_groups, META_FIELDS), dtype=np.int64)
    _jit.choose_groups(zp, n_chunks, meta)
    widths = meta[:, META_WIDTH]
    meta[:, META_OFFSET] = np.cumsum(widths) - widths
    esc = meta[:, META_ESC_SLOT] > 0
    meta[:, META_ESC_SLOT] = np.where(esc, np.cumsum(esc) - 1, -1)
    esc_words = np.where(esc, -(-(meta[:, META_ESC_OFFSET] * meta[:, META_ESC_WIDTH]) // 32), 0)
    meta[:, META_ESC_OFFSET] = np.where(esc, np.cumsum(esc_words) - esc_words, 0)
    meta[~esc, META_ESC_WIDTH] = 0
    meta[~esc, META_ESC_LO] = 0
    layout = _layout(group_size, int(widths.sum()), int(esc_words.sum()), int(esc.sum()))
    tensors = pack_with_layout(zp, meta, layout, name="codes")
    tensors["weight_group_meta"] = torch.from_numpy(meta.astype(np.int32))
    tensors["weight_perm"] = perm.to(torch.int32).cpu()
    tensors = {name: tensors[name].to(device) for name in CODE_TENSOR_NAMES}
    return PackedCodes(layout=layout, tensors=tensors)


def _layout(group_size: int, words: int, escape_words: int, escape_groups: int) -> dict[str, Any]:
    return {
        "format": "packed",
        "version": FORMAT_VERSION,
        "group_size": group_size,
        "escape_chunk": ESCAPE_CHUNK,
        "words": words,
        "escape_words": escape_words,
        "escape_groups": escape_groups,
    }


def _check_codes(codes: torch.Tensor, group_size: int) -> None:
    if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must be a non-empty (out, in) matrix; got {tuple(codes.shape)}.")
    if group_size != DEFAULT_GROUP_SIZE:
        raise ValueError(f"group_size={group_size}: format version 1 supports only 32.")
    biggest = max(-int(codes.min()), int(codes.max()))  # no abs(): int32 abs overflows at -2^31
    if biggest > MAX_ABS_CODE:
        raise ValueError(
            f"a code has magnitude {biggest} > {MAX_ABS_CODE}; the packed format cannot hold "
            "it. Use WaterSICLinear.from_quantized(..., format='plain')."
        )


def _pack_codes_reference(codes: torch.Tensor,
                          group_size: int = DEFAULT_GROUP_SIZE) -> PackedCodes:
    """Plain-torch twin of :func:`pack_codes` (the test oracle): a Python loop over groups, same
    arguments, same result."""
    _check_codes(codes, group_size)
    device = codes.device
    codes = codes.to(torch.int32)
    n_rows, n_cols = codes.shape
    n_groups = _cdiv(n_cols, group_size)
    n_chunks = _cdiv(n_rows, ESCAPE_CHUNK)
    perm = _column_order(codes)
    columns = codes.t()[perm]  # (K, N): permuted columns, each contiguous

    meta = torch.zeros(n_groups, META_FIELDS, dtype=torch.int64)
    main_words: list[torch.Tensor] = []
    esc_words: list[torch.Tensor] = []
    esc_bases: list[torch.Tensor] = []
    word_off = esc_off = 0
    for g in range(n_groups):
        block = columns[g * group_size : (g + 1) * group_size].long().t()  # (N, <=32)
        b, lo, uses_esc = _choose_group(block.flatten(), n_chunks)
        inner = (1 << b) - 1 if uses_esc else 1 << b
        u = block - lo
        is_esc = (u < 0) | (u >= inner) if uses_esc else torch.zeros_like(u, dtype=torch.bool)
        u = torch.where(is_esc, torch.full_like(u, inner), u)
        u = torch.nn.functional.pad(u, (0, group_size - block.shape[1]))  # padding codes: u = 0
        main_words.append(_pack_rows(u, b).t())  # (b, N)
        row = [b, word_off, lo, -1, 0, 0, 0, int(block.abs().max())]
        word_off += b
        if uses_esc:
            escaped = block[is_esc]  # row-major order = (row, column) order within the group
            esc_lo = min(int(escaped.min()), lo)
            z = escaped - esc_lo
            t = torch.where(escaped < lo, z, z - inner)
            e = int(_bit_length(t.max().reshape(1))[0])
            stream = _pack_rows(t.reshape(1, -1), e).flatten()
            per_row = is_esc.sum(1)
            per_chunk = torch.nn.functional.pad(per_row, (0, n_chunks * ESCAPE_CHUNK - n_rows))
            per_chunk = per_chunk.view(n_chunks, ESCAPE_CHUNK).sum(1)
            esc_bases.append(torch.cumsum(per_chunk, 0) - per_chunk)
            row[META_ESC_SLOT:META_MAXABS] = [len(esc_bases) - 1, e, esc_lo, esc_off]
            esc_words.append(stream)
            esc_off += stream.numel()
        meta[g] = torch.tensor(row, dtype=torch.int64)

    tensors = {
        "weight_packed": torch.cat(main_words, 0).contiguous()
        if word_off
        else torch.zeros(0, n_rows, dtype=torch.int32, device=device),
        "weight_group_meta": meta.to(torch.int32).to(device),
        "weight_perm": perm.to(torch.int32),
        "weight_escape_packed": torch.cat(esc_words).to(torch.int32)
        if esc_words
        else torch.zeros(0, dtype=torch.int32, device=device),
        "weight_escape_base": torch.stack(esc_bases).to(torch.int32)
        if esc_bases
        else torch.zeros(0, n_chunks, dtype=torch.int32, device=device),
    }
    layout = _layout(group_size, word_off, esc_off, len(esc_bases))
    return PackedCodes(layout=layout, tensors=tensors)


# ---------------------------------------------------------------------------- unpacking
def unpack_codes(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int
) -> torch.Tensor:
    """Decode the ``"packed"`` format back to the integer code matrix (the reference decoder).

    Escapes are numbered from scratch here (all markers of a group in order), so this decoder
    does not read ``weight_escape_base``; the kernels do, and the tests compare the two.

    Args:
        tensors (`dict[str, torch.Tensor]`): the five tensors of `CODE_TENSOR_NAMES`.
        in_features (`int`): ``K``.
        out_features (`int`): ``N``.

    Returns:
        `torch.Tensor` of shape `(N, K)`, int32.
    """
    packed = tensors["weight_packed"]
    meta = tensors["weight_group_meta"].to(torch.int64)
    perm = tensors["weight_perm"].to(torch.int64)
    device = packed.device
    n_groups, gs = meta.shape[0], DEFAULT_GROUP_SIZE
    pos = torch.arange(n_groups * gs, device=device)  # permuted positions, padding included
    m = meta[pos // gs]  # (Kp, 8)
    b = m[:, META_WIDTH]
    bitpos = (pos % gs) * b
    # main stream: column n of weight_packed is row n's word stream; read all rows at once
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (W, N)
    last = max(words.shape[0] - 1, 0)
    j0 = m[:, META_OFFSET] + (bitpos >> 5)
    if words.shape[0]:
        w0 = words[j0.clamp(0, last)]  # (Kp, N)
        w1 = words[(j0 + 1).clamp(0, last)]
        u = ((w0 | (w1 << 32)) >> (bitpos & 31)[:, None]) & ((1 << b) - 1)[:, None]
        u = torch.where((b > 0)[:, None], u, torch.zeros_like(u))
    else:
        u = torch.zeros(pos.numel(), out_features, dtype=torch.int64, device=device)
    has_esc = m[:, META_ESC_SLOT] >= 0
    inner = torch.where(has_esc, (1 << b) - 1, 1 << b)
    valid = pos < in_features
    is_esc = has_esc[:, None] & (u == inner[:, None]) & valid[:, None]  # (Kp, N)
    codes = u + m[:, META_LO, None]
    if bool(is_esc.any()):
        # nonzero() of the (group, row, column) view lists the escapes exactly in the order they
        # are numbered: per group, row-major over the group's N × 32 block
        g, n, k = is_esc.view(n_groups, gs, out_features).transpose(1, 2).nonzero(as_tuple=True)
        per_group = torch.bincount(g, minlength=n_groups)
        start = torch.cumsum(per_group, 0) - per_group
        rank = torch.arange(g.numel(), device=device) - start[g]
        mg = meta[g]
        fields = _extract(
            tensors["weight_escape_packed"],
            mg[:, META_ESC_OFFSET] * 32 + rank * mg[:, META_ESC_WIDTH],
            mg[:, META_ESC_WIDTH],
        )
        z = fields + mg[:, META_ESC_LO]
        inner_g = (1 << mg[:, META_WIDTH]) - 1
        codes[g * gs + k, n] = torch.where(z >= mg[:, META_LO], z + inner_g, z)
    out = torch.empty(out_features, in_features, dtype=torch.int32, device=device)
    out[:, perm] = codes[:in_features].t().to(torch.int32)
    return out


# ---------------------------------------------------------------------------- compiled paths
def pack_with_layout(
    codes: np.ndarray, meta: np.ndarray, layout: dict[str, Any], *, name: str
) -> dict[str, torch.Tensor]:
    """Pack codes (permuted column order) with a validated stored layout, on the CPU.

    Args:
        codes (`np.ndarray` of shape `(N, K)`, int32): codes, column ``p`` = original column
            ``perm[p]``.
        meta (`np.ndarray` of shape `(NG, 8)`, int64): from :func:`validate_layout`.
        layout (`dict`): the layer's layout entry.
        name (`str`): module name for messages.

    Returns:
        ``weight_packed`` `(W, N)`, ``weight_escape_packed`` `(WE,)` and ``weight_escape_base``
        `(NGE, NC)`, int32 CPU tensors.

    Raises:
        ValueError: a code does not fit the layout, or the stored escape offsets / largest
            magnitudes disagree with the codes (corrupted or crafted file).
    """
    target = pack_target(codes.shape[0], meta, layout)
    status = _jit.pack_rows(np.ascontiguousarray(codes, dtype=np.int32), codes.shape[0], 0, meta,
                            target)
    return finish_packing(target, status, meta, layout, name=name)


def pack_target(n_rows: int, meta: np.ndarray, layout: dict[str, Any]) -> _jit.PackTarget:
    """Zeroed outputs for :func:`_packing_jit.pack_rows` of an ``n_rows``-row matrix."""
    n_chunks = _cdiv(n_rows, ESCAPE_CHUNK)
    n_slots = int(layout["escape_groups"])
    slot_rows = np.flatnonzero(meta[:, META_ESC_SLOT] >= 0)
    slot_word = np.append(meta[slot_rows, META_ESC_OFFSET], int(layout["escape_words"]))
    return _jit.PackTarget(
        packed=np.zeros((int(layout["words"]), n_rows), dtype=np.uint32),
        esc_words=np.zeros(int(layout["escape_words"]), dtype=np.uint32),
        escape_base=np.zeros((n_slots, n_chunks), dtype=np.int64),
        biggest=np.zeros(meta.shape[0], dtype=np.int64),
        slot_word=slot_word.astype(np.int64),
        slot_count=np.zeros(slot_rows.size, dtype=np.int64),
    )


def finish_packing(target: _jit.PackTarget, status: int, meta: np.ndarray,
                   layout: dict[str, Any], *, name: str) -> dict[str, torch.Tensor]:
    """Check a filled :class:`_packing_jit.PackTarget` against the group table and return the
    packed tensors (int32 views, no copy).

    Raises:
        ValueError: a code did not fit, the escape streams do not have the stored sizes, or the
            stored largest |code| per group is not the codes' (corrupted or crafted file).
    """
    if status:
        raise ValueError(f"{name}: {_jit.ERRORS[int(status)]}")
    _check_escape_words(target.slot_count, meta, layout, name)
    if not np.array_equal(target.biggest, meta[:, META_MAXABS]):
        raise ValueError(f"{name}.weight_group_meta: the stored largest |code| per group does "
                         "not match the codes (corrupted or crafted file)")
    return {
        "weight_packed": torch.from_numpy(target.packed.view(np.int32)),
        "weight_escape_packed": torch.from_numpy(target.esc_words.view(np.int32)),
        "weight_escape_base": torch.from_numpy(target.escape_base.astype(np.int32)),
    }


def _check_escape_words(totals: np.ndarray, meta: np.ndarray, layout: dict[str, Any],
                        name: str) -> None:
    """Check that the stored escape word offsets are exactly what ``totals`` escapes per slot
    need."""
    slot_rows = np.flatnonzero(meta[:, META_ESC_SLOT] >= 0)
    need = -(-(totals * meta[slot_rows, META_ESC_WIDTH]) // 32)
    offsets = np.cumsum(need) - need
    if (not np.array_equal(offsets, meta[slot_rows, META_ESC_OFFSET])
            or int(need.sum()) != layout["escape_words"]):
        raise ValueError(f"{name}: the escape stream sizes in weight_group_meta do not match "
                         "the codes (corrupted or crafted file)")


def _escape_plan(
    counts: np.ndarray, meta: np.ndarray, layout: dict[str, Any], name: str
) -> np.ndarray:
    """Escape bases per chunk ``(NGE, NC)`` from the per-chunk escape counts; checks that the
    stored escape word offsets are exactly what the counts need."""
    _check_escape_words(counts.sum(axis=1), meta, layout, name)
    return np.cumsum(counts, axis=1) - counts


def permuted_codes(tensors: dict[str, torch.Tensor], in_features: int,
                   out_features: int) -> np.ndarray:
    """Codes of a packed module in permuted column order, ``(N, K)`` int32 (compiled unpack;
    what a save encodes, so the stream is written in the order a loader packs it)."""
    meta = tensors["weight_group_meta"].detach().cpu().numpy().astype(np.int64)
    out = np.empty((out_features, in_features), dtype=np.int32)
    _jit.unpack_words(
        np.ascontiguousarray(tensors["weight_packed"].detach().cpu().numpy()), meta,
        np.ascontiguousarray(tensors["weight_escape_packed"].detach().cpu().numpy()),
        tensors["weight_escape_base"].detach().cpu().numpy().astype(np.int64), out)
    return out
