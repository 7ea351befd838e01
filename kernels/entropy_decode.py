"""Segmented-rANS decoder on the GPU (codec format version 2, see docs/format.md).

One program decodes one segment: its ``L <= 64`` lanes advance in lockstep, one symbol per lane
per step. The lanes that need a new 16-bit word take consecutive words of the segment's stream
in lane order (an exclusive prefix sum over the lanes), and escape codes take their raw bits from
the segment's escape bit range the same way. So only the compressed bytes travel to the GPU; the
codes are written in permuted column order, ready to be packed on the device.

The plain twin is ``watersic_hf.storage._jit.rans_decode_segments`` (the CPU decoder, same
arguments up to array types and the same status codes); the tests compare the two under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from .._triton import require_triton, tl, triton

__all__ = ["triton_decode_segments"]

PRECISION = 12
STATE_LOW = 1 << 16
MAX_LANES = 64
# status codes, as in watersic_hf.storage._jit
E_SHORT, E_LONG, E_STATE, E_ESCAPE, E_HEADER = 1, 2, 3, 4, 6


@triton.jit
def _load_u8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int64) & 0xFF


@triton.jit
def _decode_segments_kernel(
    coded_ptr, seg_off_ptr, esc_ptr, esc_off_ptr, table_ptr, col_table_ptr, lanes_ptr,
    out_ptr, err_ptr,
    n_rows, k, seg_rows, esc_total_bits,
    BLOCK_L: tl.constexpr,
):
    s = tl.program_id(0)
    r0 = s * seg_rows
    rows = tl.minimum(seg_rows, n_rows - r0)
    n_sym = rows.to(tl.int64) * k
    n_lanes = tl.load(lanes_ptr + s).to(tl.int64)
    p0 = tl.load(seg_off_ptr + s)
    end = tl.load(seg_off_ptr + s + 1)
    ebit = tl.load(esc_off_ptr + s)
    ebit_end = tl.load(esc_off_ptr + s + 1)
    bad_header = ((p0 + 4 * n_lanes > end) | ((end - p0 - 4 * n_lanes) % 2 != 0)
                  | (ebit < 0) | (ebit_end > esc_total_bits) | (ebit > ebit_end))
    err = tl.where(bad_header, E_HEADER, 0)
    lane = tl.arange(0, BLOCK_L).to(tl.int64)
    # (Triton's interpreter turns `vector_bool & scalar_bool` into integers, so scalar
    # conditions gate the lanes through the bound instead.)
    lmask = lane < tl.where(err == 0, n_lanes, 0)
    q = p0 + 4 * lane
    x = (_load_u8(coded_ptr, q, lmask) | (_load_u8(coded_ptr, q + 1, lmask) << 8)
         | (_load_u8(coded_ptr, q + 2, lmask) << 16) | (_load_u8(coded_ptr, q + 3, lmask) << 24))
    wp = p0 + 4 * n_lanes
    steps = tl.cdiv(n_sym, n_lanes)
    for step in range(0, steps):
        i = step * n_lanes + lane
        active = (lane < tl.where(err == 0, n_lanes, 0)) & (i < n_sym)
        col = i % k
        table = tl.load(col_table_ptr + col, mask=active, other=0).to(tl.int64)
        slot = (table << PRECISION) + (x & ((1 << PRECISION) - 1))
        ent = tl.load(table_ptr + slot, mask=active, other=0).to(tl.int64) & 0xFFFFFFFF
        tok = tl.where(active, (ent & 0xFF) - 128, 0)
        xn = ((ent >> 20) + 1) * (x >> PRECISION) + ((ent >> 8) & 0xFFF)
        need = active & (xn < STATE_LOW)
        need_i = need.to(tl.int64)
        wpos = wp + 2 * (tl.cumsum(need_i, 0) - need_i)
        readable = need & (wpos + 2 <= end)
        word = _load_u8(coded_ptr, wpos, readable) | (_load_u8(coded_ptr, wpos + 1, readable) << 8)
        xn = tl.where(need, (xn << 16) | word, xn)
        x = tl.where(active, xn, x)
        wp = wp + 2 * tl.sum(need_i, 0)
        # escapes: |token| > 31 carries the octave; the low bits are raw, in symbol order
        mag = tl.abs(tok)
        is_esc = active & (mag > 31)
        m = tl.where(is_esc, mag - 32, 0)
        octave = (m >> 1) + 5
        width = tl.where(is_esc, octave - 1, 0)
        epos = ebit + tl.cumsum(width, 0) - width
        ok = is_esc & (epos + width <= ebit_end)
        byte = epos >> 3
        window = (_load_u8(esc_ptr, byte, ok) | (_load_u8(esc_ptr, byte + 1, ok) << 8)
                  | (_load_u8(esc_ptr, byte + 2, ok) << 16)
                  | (_load_u8(esc_ptr, byte + 3, ok) << 24)
                  | (_load_u8(esc_ptr, byte + 4, ok) << 32))
        one = tl.zeros_like(width) + 1
        raw = (window >> (epos & 7)) & ((one << width) - 1)
        big = (one << octave) | ((m & 1) << (octave - 1)) | raw
        code = tl.where(is_esc, tl.where(tok < 0, -big, big), tok)
        ebit = ebit + tl.sum(width, 0)
        tl.store(out_ptr + r0.to(tl.int64) * k + i, code.to(tl.int32), mask=active)
        short = tl.sum((need & ~readable).to(tl.int32), 0)
        bad_esc = tl.sum((is_esc & ~ok).to(tl.int32), 0)
        err = tl.where((err == 0) & (short > 0), E_SHORT, err)
        err = tl.where((err == 0) & (bad_esc > 0), E_ESCAPE, err)
    err = tl.where((err == 0) & (wp != end), E_LONG, err)
    err = tl.where((err == 0) & (ebit != ebit_end), E_ESCAPE, err)
    bad_state = tl.sum(((lane < n_lanes) & (x != STATE_LOW)).to(tl.int32), 0)
    err = tl.where((err == 0) & (bad_state > 0), E_STATE, err)
    tl.store(err_ptr + s, err)


def triton_decode_segments(
    coded: torch.Tensor,  # (C,) uint8
    seg_off: torch.Tensor,  # (S + 1,) int64
    escapes: torch.Tensor,  # (E + 8,) uint8, zero slack at the end
    esc_off: torch.Tensor,  # (S + 1,) int64
    table: torch.Tensor,  # (n_tables * 4096,) int32: the uint32 entries of the slot table
    col_table: torch.Tensor,  # (K,) int32
    lanes: torch.Tensor,  # (S,) int32
    seg_rows: int,
    shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every segment on the tensors' device.

    Returns:
        ``(codes, errors)``: codes `(N, K)` int32 in the stored column order, and a status code
        per segment `(S,)` int32 (0 = fine; see ``watersic_hf.storage._jit.ERRORS``).
    """
    require_triton()
    n_rows, k = shape
    device = coded.device
    out = torch.empty((n_rows, k), dtype=torch.int32, device=device)
    errors = torch.zeros(lanes.numel(), dtype=torch.int32, device=device)
    if lanes.numel() == 0:
        return out, errors
    esc_total_bits = 8 * (escapes.numel() - 8)
    _decode_segments_kernel[(lanes.numel(),)](
        coded, seg_off, escapes, esc_off, table, col_table, lanes, out, errors,
        n_rows, k, seg_rows, esc_total_bits, BLOCK_L=MAX_LANES,
    )
    return out, errors
