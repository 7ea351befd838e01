"""Fused unpack–scale–matmul for WaterSIC's packed format (see docs/kernels.md).

Computes ``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` straight from the packed words
of ``watersic_hf.packing`` in one launch (prefill adds one ``index_select`` that puts the
activation columns in packed order):

```
for each output tile (rows m, columns n) and each K-split:
    acc = 0                                          # fp32
    for step in this split:                          # a step = GPS groups of 32 columns
        z  = decode(step, rows n)                    # int32 [32·GPS, BLOCK_N], escapes resolved
        xs = x[m, perm[step's positions]] · col_scale   # fp32 [BLOCK_M, 32·GPS]
        acc += xs @ z                                # tl.dot, or broadcast-FMA for M <= 4
    y = acc · row_scale[n] + bias[n]                 # stored, or atomically added (split-K)
```

Escapes are applied inside the kernel: a group with escapes reserves the value ``2^b - 1`` as a
marker; the kernel numbers the markers of its tile with a prefix sum (within rows, then over
rows of a 32-row chunk, plus the chunk's stored base count) and reads each escape's ``e``-bit
field from the escape stream. There is no second launch and no correction pass.

Numerics: activations are loaded, converted to fp32 (required by Triton's interpreter for
bf16, harmless on GPU) and multiplied by the fp16 column scale in fp32. The tensor-core path
feeds ``tl.dot`` with the activation dtype (fp16 or bf16). Integer codes are exact in fp16 up
to 2048 and in bf16 up to 256; a group holding a larger code (known from its stored max |code|)
is multiplied digit by digit (balanced base-2048 / base-256 digits, one dot each), so no code
is ever rounded. Accumulation is always fp32. fp32 activations use the fp32 ``ieee`` dot.
"""

from __future__ import annotations

from typing import Any

import torch

from .._triton import HAS_TRITON, interpreter_enabled, require_triton, tl, triton
from .autotune import decode_configs, early_prune_decode, early_prune_prefill, prefill_configs

__all__ = ["DECODE_MAX_M", "triton_packed_matmul"]

GROUP = 32  # columns per width group (packing.DEFAULT_GROUP_SIZE)
ESC_CHUNK = 32  # rows per escape base count (packing.ESCAPE_CHUNK)
META_FIELDS = 8
DECODE_MAX_M = 16  # rows of x up to which the split-K decode kernel is used
FMA_MAX_M = 4  # up to this many rows the decode kernel uses broadcast-FMA instead of tl.dot
DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2
_EXACT = {DOT_FP32: 2**24, DOT_FP16: 2048, DOT_BF16: 256}  # integers exactly representable


# %% -------------------------------------------------------------------------- decoding
@triton.jit
def _extract_fields(w0, w1, sh, width):
    """``width``-bit fields starting ``sh`` bits into ``w0`` and spilling into ``w1``."""
    w0 = w0.to(tl.uint32, bitcast=True)
    w1 = w1.to(tl.uint32, bitcast=True)
    shu = sh.to(tl.uint32)
    # (w1 << 1) << (31 - sh) instead of w1 << (32 - sh): a shift by 32 is undefined
    f = (w0 >> shu) | ((w1 << 1) << (31 - shu))
    return (f & ((1 << width) - 1).to(tl.uint32)).to(tl.int32, bitcast=True)


@triton.jit
def _decode_tile(
    packed_ptr, meta_ptr, esc_ptr, esc_base_ptr,  # pointers
    g0, offs_n, n_mask, N, K, NG, NC,  # first group of the tile, output rows, sizes
    BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GPS: tl.constexpr, ESC_CHUNK: tl.constexpr,
):
    """Codes of groups ``g0 .. g0+GPS-1`` for rows ``offs_n``: int32 ``[GPS·GROUP, BLOCK_N]``.

    Row ``k`` of the result is permuted position ``g0·GROUP + k``; positions past ``K`` are 0.
    Every quantity is a vector over the tile's positions (the group's metadata is gathered
    per position), so the loads of all ``GPS`` groups are independent and in flight together.
    """
    BLOCK_K: tl.constexpr = GPS * GROUP
    offs_k = tl.arange(0, BLOCK_K)
    grp = g0 + offs_k // GROUP
    kin = offs_k % GROUP
    k_valid = (grp < NG) & (grp * GROUP + kin < K)
    meta = meta_ptr + grp * 8
    b = tl.load(meta + 0, mask=k_valid, other=0)
    word_off = tl.load(meta + 1, mask=k_valid, other=0)
    lo = tl.load(meta + 2, mask=k_valid, other=0)
    nm = n_mask[None, :]

    # ---- main stream: code kin of a row is bits [kin·b, kin·b + b) of its group's b words
    bitpos = kin * b
    sh = bitpos & 31
    rows0 = packed_ptr + (word_off + (bitpos >> 5)).to(tl.int64)[:, None] * N + offs_n[None, :]
    w0 = tl.load(rows0, mask=nm & (b > 0)[:, None], other=0)
    w1 = tl.load(rows0 + N, mask=nm & ((sh + b) > 32)[:, None], other=0)  # straddling fields
    u = _extract_fields(w0, w1, sh[:, None], b[:, None])
    z = u + lo[:, None]

    # ---- escapes: in a group with an escape slot, u == 2^b - 1 marks one
    offs_g = tl.arange(0, GPS)
    slot_g = tl.load(meta_ptr + (g0 + offs_g) * 8 + 3, mask=g0 + offs_g < NG, other=-1)
    if tl.max(slot_g, axis=0) >= 0:
        slot = tl.load(meta + 3, mask=k_valid, other=-1)
        inner = (1 << b) - 1
        is_esc = (u == inner[:, None]) & ((slot >= 0) & k_valid)[:, None] & nm
        # number the markers of each group in (row, column) order: earlier columns of the same
        # row, plus earlier rows of the same 32-row chunk, plus the chunk's stored base count
        ie = tl.reshape(is_esc.to(tl.int32), (GPS, GROUP, BLOCK_N))
        in_row = tl.cumsum(ie, axis=1) - ie
        per_row = tl.reshape(tl.sum(ie, axis=1), (GPS, BLOCK_N // ESC_CHUNK, ESC_CHUNK))
        row_pre = tl.reshape(tl.cumsum(per_row, axis=2) - per_row, (GPS, BLOCK_N))
        base = tl.load(esc_base_ptr + slot_g[:, None] * NC + (offs_n // ESC_CHUNK)[None, :],
                       mask=(slot_g >= 0)[:, None] & nm, other=0)
        rank = tl.reshape((base + row_pre)[:, None, :] + in_row, (BLOCK_K, BLOCK_N))
        e = tl.load(meta + 4, mask=k_valid, other=0)
        esc_lo = tl.load(meta + 5, mask=k_valid, other=0)
        esc_off = tl.load(meta + 6, mask=k_valid, other=0)
        ebit = rank * e[:, None]
        esh = ebit & 31
        eptr = esc_ptr + esc_off[:, None] + (ebit >> 5)
        v0 = tl.load(eptr, mask=is_esc & (e > 0)[:, None], other=0)
        v1 = tl.load(eptr + 1, mask=is_esc & ((esh + e[:, None]) > 32), other=0)
        z_low = _extract_fields(v0, v1, esh, e[:, None]) + esc_lo[:, None]
        z_esc = tl.where(z_low >= lo[:, None], z_low + inner[:, None], z_low)  # skip inner range
        z = tl.where(is_esc, z_esc, z)
    return z


# %% -------------------------------------------------------------------------- the kernel
@triton.jit
def _packed_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, meta_ptr, perm_ptr, esc_ptr, esc_base_ptr,
    col_scale_ptr, row_scale_ptr, bias_ptr, out_ptr,
    # sizes: x is (M, K), out is (M, N); NG groups of 32 columns, NC chunks of 32 rows
    M, N, K, NG, NC,
    # strides (elements to step to the next row / column)
    stride_xm, stride_xk, stride_om, stride_on,
    # autotuning key only: M rounded up to a power of two
    M_BUCKET,
    # meta-parameters
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, X_PERMUTED: tl.constexpr,
    DOT_KIND: tl.constexpr,
    EXACT_LIMIT: tl.constexpr, EXACT_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, GPS: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP: tl.constexpr, ESC_CHUNK: tl.constexpr,
):
    # ---- map the program id to an output tile (grouped order keeps weight tiles in L2)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # ---- this program's share of the K steps (split-K); a step is GPS groups
    BLOCK_K: tl.constexpr = GPS * GROUP
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GPS)
    n_steps = tl.cdiv(NG, GPS)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    s_start = pid_k * per_split
    s_end = tl.minimum(s_start + per_split, n_steps)

    # ---- iterate: decode, scale the gathered activations, multiply-accumulate
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # GEMV: keep per-k partial sums and reduce over k once after the loop, so the loop
        # body is pure FMAs with no cross-thread reduction
        acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for step in range(s_start, s_end):
        g0 = step * GPS
        z = _decode_tile(packed_ptr, meta_ptr, esc_ptr, esc_base_ptr, g0, offs_n, n_mask,
                         N, K, NG, NC, BLOCK_N, GROUP, GPS, ESC_CHUNK)
        pos = g0 * GROUP + offs_k
        k_valid = pos < K
        col = tl.load(perm_ptr + pos, mask=k_valid, other=0)
        cs = tl.load(col_scale_ptr + col, mask=k_valid, other=0.0).to(tl.float32)
        if X_PERMUTED:  # the launcher gathered x's columns into permuted order (prefill)
            x_cols = pos
        else:  # gather the columns here (decode: x is a few rows, cached)
            x_cols = col
        xt = tl.load(x_rows + x_cols[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        xs = xt * cs[None, :]  # fp32 [BLOCK_M, BLOCK_K]
        if USE_DOT:
            if DOT_KIND == 0:
                acc += tl.dot(xs, z.to(tl.float32), input_precision="ieee")
            else:
                if DOT_KIND == 1:
                    xd = xs.to(tl.float16)
                else:
                    xd = xs.to(tl.bfloat16)
                maxabs = tl.max(tl.load(meta_ptr + (g0 + offs_g) * 8 + 7,
                                        mask=g0 + offs_g < NG, other=0), axis=0)
                if maxabs <= EXACT_LIMIT:
                    acc += tl.dot(xd, z.to(xd.dtype))
                else:
                    # a code the 16-bit type would round: split z into balanced base-L digits
                    # (each exact in it) and accumulate xd @ digit · L^t; one dot per digit
                    # keeps a single accumulator layout (an fp32 fallback dot made ptxas spill)
                    rem = z
                    bound = maxabs
                    scale = 1.0
                    while bound > 0:
                        hi = (rem + EXACT_LIMIT // 2) >> EXACT_SHIFT
                        digit = rem - (hi << EXACT_SHIFT)
                        acc += tl.dot(xd, digit.to(xd.dtype)) * scale
                        rem = hi
                        bound = (bound + EXACT_LIMIT // 2) >> EXACT_SHIFT
                        scale = scale * EXACT_LIMIT
        else:
            acc3 += xs[:, :, None] * z.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)

    # ---- epilogue: row scale, bias (first split only), store or accumulate
    rs = tl.load(row_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc * rs[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & ((offs_n * 0 + pid_k) == 0),
                       other=0.0).to(tl.float32)
        y += bias[None, :]
    out_ptrs = (out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, y, mask=out_mask)


if HAS_TRITON:
    _decode_tuned = triton.autotune(
        configs=decode_configs(),
        key=["M_BUCKET", "N", "K", "USE_DOT", "DOT_KIND"],
        prune_configs_by={"early_config_prune": early_prune_decode},
        reset_to_zero=["out_ptr"],
    )(_packed_matmul_kernel)
    _prefill_tuned = triton.autotune(
        configs=prefill_configs(),
        key=["M_BUCKET", "N", "K", "DOT_KIND"],
        prune_configs_by={"early_config_prune": early_prune_prefill},
    )(_packed_matmul_kernel)


# %% -------------------------------------------------------------------------- launcher
def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _dot_kind(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return DOT_FP16
    if dtype == torch.bfloat16 and not interpreter_enabled():
        return DOT_BF16
    # fp32 activations, and bf16 under the interpreter (whose bf16 dot is broken)
    return DOT_FP32


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    # Triton needs a real allocation behind every pointer argument, even if never read
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _launch(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_meta: torch.Tensor,
    perm: torch.Tensor,
    escape_packed: torch.Tensor,
    escape_base: torch.Tensor,
    col_scale: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Check, allocate, launch. ``config`` (tests, interpreter) bypasses autotuning; it holds
    ``BLOCK_N``, ``GPS`` (groups per K step) and, for decode, ``SPLIT_K``, for prefill
    ``BLOCK_M``."""
    require_triton()
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K); got shape {tuple(x.shape)}.")
    m, k = x.shape
    n = packed.shape[1]
    n_groups = group_meta.shape[0]
    if perm.shape[0] != k or n_groups != -(-k // GROUP) or row_scale.shape[0] != n:
        raise ValueError(
            f"packed tensors do not match x: x has K={k}, perm has {perm.shape[0]} entries, "
            f"group_meta has {n_groups} groups, row_scale has {row_scale.shape[0]} rows."
        )
    devices = {t.device for t in (x, packed, group_meta, perm, col_scale, row_scale)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}.")
    if m == 0:
        return x.new_empty(0, n)
    n_chunks = -(-n // ESC_CHUNK)
    decode = m <= DECODE_MAX_M
    use_dot = not decode or m > FMA_MAX_M
    kind = _dot_kind(x.dtype)
    if decode:
        # split-K partial sums meet in an fp32 buffer (atomics), cast once at the end
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        block_m = 16 if use_dot else _next_pow2(m)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        block_m = None
        # every M-tile reads its activations once per K step: gather the columns into the
        # packed order once (one contiguous copy) instead of scattered loads in every tile
        x = x.index_select(1, perm.long())
    args = (
        x, _nonempty(packed), group_meta.contiguous(), perm.contiguous(),
        _nonempty(escape_packed), _nonempty(escape_base), col_scale.contiguous(),
        row_scale.contiguous(), bias if bias is not None else out, out,
        m, n, k, n_groups, n_chunks,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        _next_pow2(m),
    )
    fixed = dict(
        HAS_BIAS=bias is not None, USE_DOT=use_dot, X_PERMUTED=not decode, DOT_KIND=kind,
        EXACT_LIMIT=_EXACT[kind], EXACT_SHIFT=_EXACT[kind].bit_length() - 1,
        GROUP_M=8, GROUP=GROUP, ESC_CHUNK=ESC_CHUNK,
    )
    if decode:
        fixed["BLOCK_M"] = block_m
    else:
        fixed["SPLIT_K"] = 1

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles, meta["SPLIT_K"])

    if config is None and interpreter_enabled():
        # the interpreter is far too slow to autotune: take one reasonable tile
        config = {"BLOCK_N": 64 if n > 32 else 32, "GPS": 2}
        if decode:
            config["SPLIT_K"] = 2 if n_groups > 2 else 1
        else:
            config["BLOCK_M"] = 32 if m <= 32 else 64
    if config is not None:
        params = {**fixed, **config}
        if params["BLOCK_N"] % ESC_CHUNK or params["GPS"] & (params["GPS"] - 1):
            raise ValueError(
                f"config {config}: BLOCK_N must be a multiple of {ESC_CHUNK} and GPS a power of 2."
            )
        if not decode and params.get("SPLIT_K", 1) != 1:
            raise ValueError("the prefill kernel (M > 16) does not split K; use SPLIT_K=1.")
        _packed_matmul_kernel[grid](*args, **params)
    elif decode:
        _decode_tuned[grid](*args, **fixed)
    else:
        _prefill_tuned[grid](*args, **fixed)
    return out.to(x.dtype) if decode else out


def _compile_signature(x_dtype: str, config: dict[str, Any]) -> tuple[dict[str, str], dict]:
    """Signature and constexprs to compile the kernel ahead of time with ``triton.compile``.

    Used to build the kernel for a GPU target on a machine without one (tests, the compile
    report of benchmarks/bench_kernels.py). ``x_dtype`` is ``"fp16"``, ``"bf16"`` or ``"fp32"``;
    ``config`` holds ``M`` (decides the output dtype as the launcher does), ``USE_DOT``,
    ``DOT_KIND``, ``BLOCK_M``, ``BLOCK_N``, ``SPLIT_K`` and ``GPS``.
    """
    out = "fp32" if config["M"] <= DECODE_MAX_M else x_dtype
    ptrs = ["x_ptr", "packed_ptr", "meta_ptr", "perm_ptr", "esc_ptr", "esc_base_ptr",
            "col_scale_ptr", "row_scale_ptr", "bias_ptr", "out_ptr"]
    types = [x_dtype, "i32", "i32", "i32", "i32", "i32", "fp16", "fp16", out, out]
    sig = {name: f"*{t}" for name, t in zip(ptrs, types, strict=True)}
    for name in ("M", "N", "K", "NG", "NC", "stride_xm", "stride_xk", "stride_om", "stride_on",
                 "M_BUCKET"):
        sig[name] = "i32"
    kind = config["DOT_KIND"]
    consts = dict(
        HAS_BIAS=True, USE_DOT=config["USE_DOT"], X_PERMUTED=config["M"] > DECODE_MAX_M,
        DOT_KIND=kind, EXACT_LIMIT=_EXACT[kind],
        EXACT_SHIFT=_EXACT[kind].bit_length() - 1, BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"], SPLIT_K=config["SPLIT_K"], GPS=config["GPS"], GROUP_M=8,
        GROUP=GROUP, ESC_CHUNK=ESC_CHUNK,
    )
    sig.update({name: "constexpr" for name in consts})
    return sig, consts


def triton_packed_matmul(
    x: torch.Tensor,  # (M, K) fp16 / bf16 / fp32
    packed: torch.Tensor,  # (W, N) int32
    group_meta: torch.Tensor,  # (NG, 8) int32
    perm: torch.Tensor,  # (K,) int32
    escape_packed: torch.Tensor,  # (WE,) int32
    escape_base: torch.Tensor,  # (NGE, NC) int32
    col_scale: torch.Tensor,  # (K,) fp16
    row_scale: torch.Tensor,  # (N,) fp16
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` from packed codes, one launch.

    Twin of ``watersic_hf.ops.torch_packed_matmul`` (same signature). ``M <= 16`` runs the
    split-K decode kernel, larger ``M`` the tiled prefill kernel; both autotuned per
    (M bucket, N, K, dtype). On CPU tensors this needs ``TRITON_INTERPRET=1``.

    Returns:
        `torch.Tensor` of shape `(M, N)` and dtype ``x.dtype``.
    """
    return _launch(x, packed, group_meta, perm, escape_packed, escape_base, col_scale,
                   row_scale, bias)
