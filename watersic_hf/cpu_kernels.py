"""Fast CPU path for WaterSIC's packed format: numba kernels that read the packed words directly.

``cpu_packed_matmul`` is the twin of ``watersic_hf.ops.torch_packed_matmul`` (same signature,
same result up to the fp32 summation order): ``y = row_scale · ((x · col_scale) @ codesᵀ) +
bias``, without ever materialising the code matrix.

```
decode (M <= 16), threads split the rows:    prefill (M > 16):
  xs = x[:, perm] · col_scale[perm]            xs = x[:, perm] · col_scale[perm]       (torch)
  for each block of <= 256 rows:               for each tile of rows n0 .. n1:
    for each group g of 32 columns:              buf = decode(all groups, rows) · row_scale
      tile = decode(g, rows)     # (32, rows)      (numba, threads split the groups)
      acc += xs[:, g] @ tile                     y[:, n0:n1] = bias + xs @ buf      (BLAS)
    y = acc · row_scale + bias
```

Decoding a group (`_decode_group`) works on a block of output rows at once. For a fixed column
``k`` of the group, the field's word and shift are the same for every row, and the words of
consecutive rows are contiguous in ``weight_packed`` (``(W, N)``, rows contiguous), so the loop
over rows compiles to SIMD loads, a funnel shift (``llvm.fshr``: the two words a field may
straddle), a mask and an int→float conversion. That loop also records, per row, a 32-bit mask
of the columns holding the marker ``2^b - 1``. The escape pass then lists the set bits of each
32-row chunk in (row, column) order (``vpcompressd`` on AVX-512, a bit walk elsewhere), which is
the order of their fields in the escape stream from the chunk's ``weight_escape_base`` count on,
and writes the decoded escape codes over the markers.

Why numba: it is a pip wheel (no compiler at install or run time), releases the GIL, has a
thread pool (``prange``) and caches compiled code on disk (``cache=True``). Every kernel takes
C-contiguous arrays of one fixed dtype each, so each compiles once. Indices in the SIMD loops
are unsigned: numba wraps negative signed indices, and that select turns contiguous loads into
gathers. Measurements that chose this design: docs/benchmarks.md, ``bench_cpu_inference``.
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

__all__ = ["DECODE_MAX_M", "cpu_packed_matmul"]

DECODE_MAX_M = 16  # activation rows up to which the fused GEMV is used (above: BLAS)
MAX_ROW_BLOCK = 256  # decode: rows per block (the per-column setup is paid once per block)
PREFILL_TILE_BYTES = 4 << 20  # prefill: size of the reused fp32 buffer of decoded codes
GROUP = 32  # columns per group = rows per escape chunk (format version 1)

_HOST_FEATURES = llvm.get_host_cpu_features()
HAS_AVX512 = bool(_HOST_FEATURES.get("avx512f", False))
# vpcompressd lists a row's escape columns without a branch per bit; without AVX-512, LLVM
# would expand the compress store into one branch per lane, so the bit walk runs instead.
# A runtime argument of the kernels (not a compile-time constant), so tests can run both.
_USE_COMPRESS = HAS_AVX512


# ------------------------------------------------------------------ LLVM intrinsics
@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers.

    LLVM prefers 256-bit vectors on Intel server cores; the decode loops are pure integer and
    FMA work, which measured 1.3× faster with 512-bit vectors on a Xeon. A no-op on machines
    without AVX-512.
    """
    sig = types.none()

    def codegen(context, builder, signature, args):
        if HAS_AVX512:
            # string attributes are valid LLVM IR; llvmlite's set only lists keyword ones
            attrs = builder.function.attributes
            set.add(attrs, '"prefer-vector-width"="512"')
            set.add(attrs, '"min-legal-vector-width"="512"')
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fshr32(typingctx, hi, lo, shift):
    """Low 32 bits of ``(hi:lo) >> (shift mod 32)``: a field that may straddle two words, in one
    instruction (``vpshrdvd`` on AVX-512 VBMI2) and without numba's promotion to int64."""
    sig = types.uint32(types.uint32, types.uint32, types.uint32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.fshr.i32", fnty=ir.FunctionType(i32, [i32, i32, i32])
        )
        return builder.call(fn, list(args))

    return sig, codegen


@intrinsic
def _cttz64(typingctx, x):
    """Index of the lowest set bit of a non-zero uint64."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@intrinsic
def _half_to_float(typingctx, bits):
    """fp16 bit pattern (uint16) to float32, exactly (numba has no float16 on CPU)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _compress_offsets(typingctx, out, pos, mask, base, stride):
    """``out[pos + i] = base + stride · k_i`` for the set bits ``k_0 < k_1 < …`` of ``mask``.

    Two ``llvm.masked.compressstore`` of 16 lanes (``vpcompressd`` on AVX-512). Returns
    ``popcount(mask)``; ``out`` is int32 with room for 32 entries from ``pos``.
    """
    sig = types.int64(out, types.int64, types.uint32, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        _, pos_v, mask_v, base_v, stride_v = args
        i1, i16, i32, i64 = (ir.IntType(w) for w in (1, 16, 32, 64))
        lanes, bits = ir.VectorType(i32, 16), ir.VectorType(i1, 16)
        store = builder.module.declare_intrinsic(
            "llvm.masked.compressstore.v16i32",
            fnty=ir.FunctionType(ir.VoidType(), [lanes, ir.PointerType(i32), bits]),
        )

        def splat(value: ir.Value) -> ir.Value:
            one = builder.insert_element(ir.Constant(lanes, None), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(lanes, None),
                                          ir.Constant(lanes, [0] * 16))

        base, stride = splat(base_v), splat(stride_v)
        ptr = builder.gep(data, [pos_v])
        for half in range(2):
            ks = ir.Constant(lanes, list(range(16 * half, 16 * half + 16)))
            offsets = builder.add(base, builder.mul(stride, ks))
            sub = builder.trunc(builder.lshr(mask_v, ir.Constant(i32, 16 * half)), i16)
            builder.call(store, [offsets, ptr, builder.bitcast(sub, bits)])
            if half == 0:
                n_low = builder.ctpop(builder.and_(mask_v, ir.Constant(i32, 0xFFFF)))
                ptr = builder.gep(ptr, [builder.zext(n_low, i64)])
        return builder.zext(builder.ctpop(mask_v), i64)

    return sig, codegen


@intrinsic
def _escape_codes16(typingctx, esc, at, e, fmask, esc_lo, lo, inner, vals, pos):
    """Decode the 16 consecutive ``e``-bit escape fields from bit ``at`` into
    ``vals[pos : pos + 16]`` as float32 codes (AVX-512 only).

    16 fields of at most 30 bits, starting at most 31 bits into a word, lie within 16 words:
    one masked 512-bit load (lanes past the stream's end read 0), two ``vpermd`` that give each
    lane its word and the next one, and a funnel shift. Lanes past the chunk's last escape
    hold garbage that is never read.
    """
    sig = types.none(esc, types.uint64, types.uint64, types.uint32, types.int32, types.int32,
                     types.int32, vals, types.int64)

    def codegen(context, builder, signature, args):
        esc_a = context.make_array(signature.args[0])(context, builder, args[0])
        vals_a = context.make_array(signature.args[7])(context, builder, args[7])
        _, at_v, e_v, fmask_v, esc_lo_v, lo_v, inner_v, _, pos_v = args
        i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
        v32, v64 = ir.VectorType(i32, 16), ir.VectorType(i64, 16)
        vbool, vf32 = ir.VectorType(i1, 16), ir.VectorType(ir.FloatType(), 16)

        def splat(value: ir.Value, vtype: ir.VectorType) -> ir.Value:
            one = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vtype, None),
                                          ir.Constant(v32, [0] * 16))

        def const(value: int) -> ir.Value:
            return ir.Constant(v32, [value] * 16)

        word0 = builder.lshr(at_v, ir.Constant(i64, 5))
        in_stream = builder.icmp_unsigned(
            "<", builder.add(splat(word0, v64), ir.Constant(v64, list(range(16)))),
            splat(esc_a.nitems, v64))
        ptr = builder.gep(esc_a.data, [word0])
        load = builder.module.declare_intrinsic(
            "llvm.masked.load.v16i32.p0", fnty=ir.FunctionType(v32, [ptr.type, i32, vbool, v32]))
        window = builder.call(load, [ptr, ir.Constant(i32, 4), in_stream, const(0)])
        first = builder.trunc(builder.and_(at_v, ir.Constant(i64, 31)), i32)
        bits = builder.add(splat(first, v32),
                           builder.mul(splat(builder.trunc(e_v, i32), v32),
                                       ir.Constant(v32, list(range(16)))))
        word = builder.lshr(bits, const(5))
        permute = builder.module.declare_intrinsic(
            "llvm.x86.avx512.permvar.si.512", fnty=ir.FunctionType(v32, [v32, v32]))
        low = builder.call(permute, [window, word])
        # word + 1 wraps to lane 0 for lane 15, whose field then ends inside word 15 (bit
        # <= 31 + 15·30 + 30 < 512), so the wrapped bits are masked off
        high = builder.call(permute, [window, builder.add(word, const(1))])
        fshr = builder.module.declare_intrinsic(
            "llvm.fshr.v16i32", fnty=ir.FunctionType(v32, [v32, v32, v32]))
        field = builder.and_(builder.call(fshr, [high, low, builder.and_(bits, const(31))]),
                             splat(fmask_v, v32))
        z = builder.add(splat(esc_lo_v, v32), field)
        skip = builder.select(builder.icmp_signed(">=", z, splat(lo_v, v32)),
                              splat(inner_v, v32), const(0))
        out = builder.gep(vals_a.data, [pos_v])
        builder.store(builder.sitofp(builder.add(z, skip), vf32),
                      builder.bitcast(out, vf32.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


_U1 = np.uint32(1)
_U5 = np.uint64(5)
_U31 = np.uint64(31)
_U32 = np.uint64(32)


# ------------------------------------------------------------------ decoding one group
@njit(nogil=True, cache=True)
def _escape_code(esc, last, at, e, fmask, esc_lo, lo, inner):
    """The escape code whose ``e``-bit field starts at bit ``at`` of the escape stream."""
    w = at >> _U5
    field = _fshr32(esc[min(w + np.uint64(1), last)], esc[w], np.uint32(at & _U31)) & fmask
    z = np.int32(esc_lo + np.int32(field))
    # the inner range [lo, lo + 2^b - 2] is skipped: fields at or above lo sit past it
    return np.float32(np.int32(z + (inner if z >= lo else np.int32(0))))


@njit(nogil=True, cache=True)
def _decode_group(packed, meta, esc, esc_base, g, n0, nb, dst, r0, marks, where, codes,
                  compress):
    """Codes of group ``g`` for rows ``[n0, n0 + nb)``, as float32 into ``dst[r0 + k, n]``.

    Args:
        packed: ``(W, N)`` uint32, the main stream. meta: ``(NG, 8)`` int32.
        esc: ``(max(WE, 1),)`` uint32, the escape stream. esc_base: ``(NGE, NC)`` int32.
        g, n0, nb: group; first row (a multiple of 32); number of rows (``<= dst.shape[1]``).
        dst: ``(R, C)`` float32; rows ``r0 .. r0 + 31``, columns ``0 .. nb - 1`` are written.
        marks: ``(>= nb + 1,)`` uint32 scratch: per row, the columns holding a marker.
        where: ``(32·32 + 32,)`` int32 scratch: flat ``dst`` offsets of one chunk's escapes.
        codes: ``(32·32 + 16,)`` float32 scratch: one chunk's escape codes.
        compress: AVX-512 only: list the escapes with ``vpcompressd`` and decode 16 fields per
            instruction sequence, rather than a bit walk with one field at a time.
    """
    _wide_vectors()
    n_words = packed.shape[0]
    b = meta[g, 0]
    off = meta[g, 1]
    lo = meta[g, 2]
    slot = meta[g, 3]
    un0 = np.uint64(n0)
    unb = np.uint64(nb)
    ur0 = np.uint64(r0)
    if b == 0:  # every code of the group is lo (a group with escapes has b >= 1)
        flo = np.float32(lo)
        for k in range(GROUP):
            for n in range(unb):
                dst[ur0 + np.uint64(k), n] = flo
        return
    mask = np.uint32((1 << b) - 1)
    if slot >= 0:
        marks[:] = 0
    for k in range(GROUP):
        bit = k * b
        j = off + (bit >> 5)
        # the next word holds the field's high bits when it straddles; otherwise fshr shifts
        # them out (clamped so that the last word of the stream is never overrun)
        j1 = min(j + 1, n_words - 1)
        shift = np.uint32(bit & 31)
        row = ur0 + np.uint64(k)
        if slot >= 0:
            kbit = _U1 << np.uint32(k)
            for n in range(unb):
                u = _fshr32(packed[j1, un0 + n], packed[j, un0 + n], shift) & mask
                marks[n] |= kbit if u == mask else np.uint32(0)
                dst[row, n] = np.float32(np.int32(np.int32(u) + lo))
        else:
            for n in range(unb):
                u = _fshr32(packed[j1, un0 + n], packed[j, un0 + n], shift) & mask
                dst[row, n] = np.float32(np.int32(np.int32(u) + lo))
    if slot < 0:
        return
    # ---- escapes: the markers of a 32-row chunk, in (row, column) order, are the chunk's
    # fields of the escape stream in order, from the stored count of earlier escapes on
    e = np.uint64(meta[g, 4])
    fmask = np.uint32((np.uint64(1) << e) - np.uint64(1))
    esc_lo = np.int32(meta[g, 5])
    inner = np.int32(mask)
    last = np.uint64(esc.shape[0] - 1)
    stream = np.uint64(meta[g, 6]) * _U32
    flat = dst.ravel()
    width = dst.shape[1]
    stride = np.uint64(width)
    for c0 in range(0, nb, 32):
        c1 = min(c0 + 32, nb)
        at = stream + np.uint64(esc_base[slot, (n0 + c0) // 32]) * e
        if compress:
            count = 0
            for n in range(c0, c1):
                count += _compress_offsets(where, count, marks[n], np.int32(r0 * width + n),
                                           np.int32(width))
            for i in range(0, count, 16):
                _escape_codes16(esc, at + np.uint64(i) * e, e, fmask, esc_lo, lo, inner,
                                codes, i)
            for i in range(np.uint64(count)):
                flat[np.uint64(where[i])] = codes[i]
        else:
            for n in range(np.uint64(c0), np.uint64(c1), np.uint64(2)):
                word = np.uint64(marks[n]) | (np.uint64(marks[n + np.uint64(1)]) << _U32)
                while word != 0:
                    t = _cttz64(word)
                    word &= word - np.uint64(1)
                    flat[(ur0 + (t & _U31)) * stride + n + (t >> _U5)] = _escape_code(
                        esc, last, at, e, fmask, esc_lo, lo, inner)
                    at += e


# ------------------------------------------------------------------ activations
@njit(nogil=True, cache=True)
def _permute_scale(x, perm, col_scale, n_groups):
    """``xs[m, p] = x[m, perm[p]] · col_scale[perm[p]]``, zero-padded to ``32·NG`` columns.

    Returns: ``(M, 32·NG)`` float32.
    """
    m_rows, k_cols = x.shape
    scale = np.empty(k_cols, np.float32)
    for p in range(k_cols):
        scale[p] = _half_to_float(col_scale[perm[p]])
    xs = np.zeros((m_rows, n_groups * GROUP), np.float32)
    for m in range(m_rows):
        for p in range(k_cols):
            xs[m, p] = x[m, perm[p]] * scale[p]
    return xs


# ------------------------------------------------------------------ decode (fused GEMV)
@njit(nogil=True, cache=True, fastmath={"contract"})
def _gemv_rows(xs, packed, meta, esc, esc_base, row_scale, bias, has_bias, compress, row0,
               row1, out):
    """``out[:, row0:row1]`` (``row0`` a multiple of 32), in blocks of at most 256 rows."""
    _wide_vectors()
    m_rows = xs.shape[0]
    if row1 <= row0:
        return
    n_blocks = (row1 - row0 + MAX_ROW_BLOCK - 1) // MAX_ROW_BLOCK
    block = ((row1 - row0 + n_blocks - 1) // n_blocks + 31) // 32 * 32
    acc = np.empty((m_rows, block), np.float32)
    tile = np.empty((GROUP, block), np.float32)
    marks = np.zeros(block + 1, np.uint32)
    where = np.empty(GROUP * GROUP + GROUP, np.int32)
    codes = np.empty(GROUP * GROUP + 16, np.float32)
    for n0 in range(row0, row1, block):
        nb = min(block, row1 - n0)
        unb = np.uint64(nb)
        acc[:, :] = 0.0
        for g in range(meta.shape[0]):
            _decode_group(packed, meta, esc, esc_base, g, n0, nb, tile, 0, marks, where,
                          codes, compress)
            base = GROUP * g
            for m in range(m_rows):
                for n in range(unb):
                    s = acc[m, n]
                    for k in range(GROUP):  # unrolled: 32 FMAs into one register per row
                        s += xs[m, base + k] * tile[k, n]
                    acc[m, n] = s
        for n in range(nb):
            rs = _half_to_float(row_scale[n0 + n])
            add = bias[n0 + n] if has_bias else np.float32(0.0)
            for m in range(m_rows):
                out[m, n0 + n] = acc[m, n] * rs + add


@njit(nogil=True, cache=True)
def _gemv_serial(x, packed, meta, perm, esc, esc_base, col_scale, row_scale, bias, has_bias,
                 compress, out):
    xs = _permute_scale(x, perm, col_scale, meta.shape[0])
    _gemv_rows(xs, packed, meta, esc, esc_base, row_scale, bias, has_bias, compress, 0,
               packed.shape[1], out)


@njit(nogil=True, cache=True, parallel=True)
def _gemv_parallel(x, packed, meta, perm, esc, esc_base, col_scale, row_scale, bias, has_bias,
                   compress, n_threads, out):
    xs = _permute_scale(x, perm, col_scale, meta.shape[0])
    n_chunks = (packed.shape[1] + 31) // 32
    for t in prange(n_threads):
        # contiguous shares of whole 32-row chunks (escape numbering restarts at chunks)
        row0 = 32 * (t * n_chunks // n_threads)
        row1 = min(32 * ((t + 1) * n_chunks // n_threads), packed.shape[1])
        _gemv_rows(xs, packed, meta, esc, esc_base, row_scale, bias, has_bias, compress, row0,
                   row1, out)


# ------------------------------------------------------------------ prefill (tiles + BLAS)
@njit(nogil=True, cache=True)
def _decode_tile_groups(packed, meta, esc, esc_base, row_scale, compress, n0, nb, g0, g1, buf):
    """``buf[32g + k, n] = code[n0 + n, 32g + k] · row_scale[n0 + n]`` for ``g0 <= g < g1``."""
    _wide_vectors()
    marks = np.zeros(buf.shape[1] + 1, np.uint32)
    where = np.empty(GROUP * GROUP + GROUP, np.int32)
    codes = np.empty(GROUP * GROUP + 16, np.float32)
    rs = np.empty(nb, np.float32)
    for n in range(nb):
        rs[n] = _half_to_float(row_scale[n0 + n])
    unb = np.uint64(nb)
    for g in range(g0, g1):
        _decode_group(packed, meta, esc, esc_base, g, n0, nb, buf, GROUP * g, marks, where,
                      codes, compress)
        for k in range(GROUP * g, GROUP * g + GROUP):
            for n in range(unb):
                buf[k, n] *= rs[n]


@njit(nogil=True, cache=True, parallel=True)
def _decode_tile_parallel(packed, meta, esc, esc_base, row_scale, compress, n0, nb, n_threads,
                          buf):
    n_groups = meta.shape[0]
    for t in prange(n_threads):
        _decode_tile_groups(packed, meta, esc, esc_base, row_scale, compress, n0, nb,
                            t * n_groups // n_threads, (t + 1) * n_groups // n_threads, buf)


# ------------------------------------------------------------------ threads: torch's OpenMP pool
# numba's own pool (prange) is a second OpenMP runtime next to torch's: after each parallel
# region, each runtime's workers spin for milliseconds, and the two pools take turns stealing
# the cores from each other (measured: decoding at 2 threads ran 7× slower than at 1 thread).
# So the kernels run their parallel loops on torch's pool: they call GOMP_parallel of the
# OpenMP library torch is linked with, on a numba cfunc that takes work units from an atomic
# counter. numba's prange is the fallback where that symbol is missing (torch without OpenMP).
def _pointer_cast(nbtype: types.Type):
    """An intrinsic that turns an int64 address into a ``CPointer(nbtype)``."""

    @intrinsic
    def cast(typingctx, address):
        sig = types.CPointer(nbtype)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(nbtype).as_pointer())

        return sig, codegen

    return cast


_f32_at = _pointer_cast(types.float32)
_u32_at = _pointer_cast(types.uint32)
_i32_at = _pointer_cast(types.int32)
_u16_at = _pointer_cast(types.uint16)
_i64_at = _pointer_cast(types.int64)


@intrinsic
def _address(typingctx, pointer):
    """A ``void*`` as int64."""
    sig = types.int64(types.voidptr)

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, address, value):
    """Atomic ``*address += value`` on an int64; returns the old value."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return sig, codegen


@intrinsic
def _omp_parallel(typingctx, gomp_parallel, worker, data, n_threads):
    """``GOMP_parallel(worker, data, n_threads, 0)``: run ``worker(data)`` on ``n_threads``
    threads of the OpenMP pool and return when all have finished."""
    sig = types.none(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [i8p])
        parallel_type = ir.FunctionType(ir.VoidType(), [fn_type.as_pointer(), i8p, i32, i32])
        builder.call(
            builder.inttoptr(args[0], parallel_type.as_pointer()),
            [builder.inttoptr(args[1], fn_type.as_pointer()), builder.inttoptr(args[2], i8p),
             builder.trunc(args[3], i32), ir.Constant(i32, 0)],
        )
        return context.get_dummy_value()

    return sig, codegen


# decode work descriptor (int64 fields), filled by _gemv_omp and read by the worker threads
_GD_XS, _GD_M, _GD_KP, _GD_PACKED, _GD_W, _GD_N, _GD_META, _GD_NG, _GD_ESC, _GD_WE = range(10)
_GD_BASE, _GD_NGE, _GD_NC, _GD_RS, _GD_BIAS, _GD_NBIAS, _GD_HAS_BIAS, _GD_OUT = range(10, 18)
_GD_COMPRESS, _GD_UNIT, _GD_NEXT, _GD_SIZE = 18, 19, 20, 21


@njit(nogil=True, cache=True)
def _gemv_units(address):
    """Worker loop: take blocks of ``unit`` rows from the descriptor's counter until none
    are left."""
    d = numba.carray(_i64_at(address), _GD_SIZE)
    n_out = d[_GD_N]
    xs = numba.carray(_f32_at(d[_GD_XS]), (d[_GD_M], d[_GD_KP]))
    packed = numba.carray(_u32_at(d[_GD_PACKED]), (d[_GD_W], n_out))
    meta = numba.carray(_i32_at(d[_GD_META]), (d[_GD_NG], 8))
    esc = numba.carray(_u32_at(d[_GD_ESC]), d[_GD_WE])
    esc_base = numba.carray(_i32_at(d[_GD_BASE]), (d[_GD_NGE], d[_GD_NC]))
    row_scale = numba.carray(_u16_at(d[_GD_RS]), n_out)
    bias = numba.carray(_f32_at(d[_GD_BIAS]), d[_GD_NBIAS])
    out = numba.carray(_f32_at(d[_GD_OUT]), (d[_GD_M], n_out))
    unit = d[_GD_UNIT]
    while True:
        row0 = _fetch_add(address + 8 * _GD_NEXT, 1) * unit
        if row0 >= n_out:
            return
        _gemv_rows(xs, packed, meta, esc, esc_base, row_scale, bias, d[_GD_HAS_BIAS] != 0,
                   d[_GD_COMPRESS] != 0, row0, min(row0 + unit, n_out), out)


@numba.cfunc(types.void(types.voidptr), nogil=True, cache=True)
def _gemv_worker(data):
    _gemv_units(_address(data))


@njit(nogil=True, cache=True)
def _gemv_omp(x, packed, meta, perm, esc, esc_base, col_scale, row_scale, bias, has_bias,
              compress, gomp_parallel, worker, n_threads, out):
    xs = _permute_scale(x, perm, col_scale, meta.shape[0])
    n_out = packed.shape[1]
    # about four blocks per thread (the counter balances them), whole 32-row escape chunks
    unit = max(64, min(MAX_ROW_BLOCK, (n_out + 4 * n_threads - 1) // (4 * n_threads)))
    d = np.zeros(_GD_SIZE, np.int64)
    d[_GD_XS], d[_GD_M], d[_GD_KP] = xs.ctypes.data, xs.shape[0], xs.shape[1]
    d[_GD_PACKED], d[_GD_W], d[_GD_N] = packed.ctypes.data, packed.shape[0], n_out
    d[_GD_META], d[_GD_NG] = meta.ctypes.data, meta.shape[0]
    d[_GD_ESC], d[_GD_WE] = esc.ctypes.data, esc.shape[0]
    d[_GD_BASE], d[_GD_NGE], d[_GD_NC] = esc_base.ctypes.data, esc_base.shape[0], esc_base.shape[1]
    d[_GD_RS], d[_GD_BIAS], d[_GD_NBIAS] = row_scale.ctypes.data, bias.ctypes.data, bias.shape[0]
    d[_GD_HAS_BIAS], d[_GD_OUT], d[_GD_COMPRESS] = has_bias, out.ctypes.data, compress
    d[_GD_UNIT] = (unit + 31) // 32 * 32
    _omp_parallel(gomp_parallel, worker, d.ctypes.data, n_threads)


# prefill work descriptor: groups of one tile of rows
_TD_PACKED, _TD_W, _TD_N, _TD_META, _TD_NG, _TD_ESC, _TD_WE, _TD_BASE, _TD_NGE = range(9)
_TD_NC, _TD_RS, _TD_COMPRESS, _TD_N0, _TD_NB, _TD_BUF, _TD_ROWS, _TD_COLS = range(9, 17)
_TD_UNIT, _TD_NEXT, _TD_SIZE = 17, 18, 19


@njit(nogil=True, cache=True)
def _tile_units(address):
    """Worker loop: take ``unit`` groups at a time from the descriptor's counter."""
    d = numba.carray(_i64_at(address), _TD_SIZE)
    n_out, n_groups = d[_TD_N], d[_TD_NG]
    packed = numba.carray(_u32_at(d[_TD_PACKED]), (d[_TD_W], n_out))
    meta = numba.carray(_i32_at(d[_TD_META]), (n_groups, 8))
    esc = numba.carray(_u32_at(d[_TD_ESC]), d[_TD_WE])
    esc_base = numba.carray(_i32_at(d[_TD_BASE]), (d[_TD_NGE], d[_TD_NC]))
    row_scale = numba.carray(_u16_at(d[_TD_RS]), n_out)
    buf = numba.carray(_f32_at(d[_TD_BUF]), (d[_TD_ROWS], d[_TD_COLS]))
    unit = d[_TD_UNIT]
    while True:
        g0 = _fetch_add(address + 8 * _TD_NEXT, 1) * unit
        if g0 >= n_groups:
            return
        _decode_tile_groups(packed, meta, esc, esc_base, row_scale, d[_TD_COMPRESS] != 0,
                            d[_TD_N0], d[_TD_NB], g0, min(g0 + unit, n_groups), buf)


@numba.cfunc(types.void(types.voidptr), nogil=True, cache=True)
def _tile_worker(data):
    _tile_units(_address(data))


@njit(nogil=True, cache=True)
def _decode_tile_omp(packed, meta, esc, esc_base, row_scale, compress, n0, nb, gomp_parallel,
                     worker, n_threads, buf):
    d = np.zeros(_TD_SIZE, np.int64)
    d[_TD_PACKED], d[_TD_W], d[_TD_N] = packed.ctypes.data, packed.shape[0], packed.shape[1]
    d[_TD_META], d[_TD_NG] = meta.ctypes.data, meta.shape[0]
    d[_TD_ESC], d[_TD_WE] = esc.ctypes.data, esc.shape[0]
    d[_TD_BASE], d[_TD_NGE], d[_TD_NC] = esc_base.ctypes.data, esc_base.shape[0], esc_base.shape[1]
    d[_TD_RS], d[_TD_COMPRESS], d[_TD_N0], d[_TD_NB] = row_scale.ctypes.data, compress, n0, nb
    d[_TD_BUF], d[_TD_ROWS], d[_TD_COLS] = buf.ctypes.data, buf.shape[0], buf.shape[1]
    d[_TD_UNIT] = max(1, meta.shape[0] // (4 * n_threads))
    _omp_parallel(gomp_parallel, worker, d.ctypes.data, n_threads)


def _find_gomp_parallel() -> int:
    """Address of ``GOMP_parallel`` in the OpenMP library torch uses, or 0 if there is none.

    Looked up through torch's own extension module, so that the symbol resolves in torch's
    dependency tree (torch ships its own libgomp; numba would load the system one).
    """
    try:
        lib = ctypes.CDLL(torch._C.__file__)
        return int(ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value or 0)
    except (AttributeError, OSError):
        return 0


_GOMP_PARALLEL = _find_gomp_parallel()


# ------------------------------------------------------------------ launcher
_local = threading.local()
_launch_lock = threading.Lock()
_launched = False


def _threads() -> int:
    """torch's intra-op thread count; also set as numba's when numba's own pool is used."""
    global _launched
    wanted = torch.get_num_threads()
    if _GOMP_PARALLEL or wanted == 1 or getattr(_local, "threads", None) == wanted:
        return wanted if _GOMP_PARALLEL else min(wanted, numba.config.NUMBA_NUM_THREADS)
    if not _launched:
        with _launch_lock:
            # starting numba's OpenMP pool sets the process-wide OpenMP thread count to the
            # pool size, which torch reads as its own: put torch's setting back
            numba.get_num_threads()
            torch.set_num_threads(wanted)
            _launched = True
    n = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)  # numba's setting is per calling thread
    _local.threads = wanted
    return n


# numpy views of each layer's weight tensors, by id of its weight_packed tensor; an entry is
# dropped when that tensor dies. A view keeps its tensor's memory alive, so a tensor that
# replaces one of them (``param.data = ...``) cannot reuse the address: comparing addresses
# detects it. (A plain dict: torch's WeakIdKeyDictionary costs ~2 µs per lookup.)
_views: dict[int, tuple[weakref.ref, tuple[int, ...], tuple[np.ndarray, ...]]] = {}


def _numpy_views(weights: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    """The seven weight tensors as the numpy arrays the kernels take (one dtype each).

    Building them costs ~15 µs, a sixth of a small layer's decode time: they are made once per
    layer and reused while the tensors keep their memory.
    """
    key = tuple(t.data_ptr() for t in weights)
    packed_t = weights[0]
    hit = _views.get(id(packed_t))
    if hit is not None and hit[0]() is packed_t and hit[1] == key:
        return hit[2]
    if not all(t.is_cpu for t in weights):
        raise ValueError("backend='cpu' needs CPU tensors; use backend='auto' on CUDA.")
    packed, meta, perm, esc, base, col_scale, row_scale = (t.contiguous() for t in weights)
    esc_np = esc.numpy().view(np.uint32)
    views = (
        packed.numpy().view(np.uint32),
        meta.numpy(),
        perm.numpy(),
        esc_np if esc_np.shape[0] else np.zeros(1, np.uint32),  # kernels read word 0
        base.numpy(),
        col_scale.numpy().view(np.uint16),  # fp16 bits: numba has no float16
        row_scale.numpy().view(np.uint16),
    )
    if all(t.is_contiguous() for t in weights):  # otherwise the views are of fresh copies
        ident = id(packed_t)
        ref = weakref.ref(packed_t, lambda _, ident=ident: _views.pop(ident, None))
        _views[ident] = (ref, key, views)
    return views


def _tile_buffer(rows: int, cols: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least ``rows × cols``, reused across calls."""
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=torch.float32)
        _local.buffer = buf
    return buf[: rows * cols].view(rows, cols)


def cpu_packed_matmul(
    x: torch.Tensor,  # (M, K) float
    packed: torch.Tensor,  # (W, N) int32
    group_meta: torch.Tensor,  # (NG, 8) int32
    perm: torch.Tensor,  # (K,) int32
    escape_packed: torch.Tensor,  # (WE,) int32
    escape_base: torch.Tensor,  # (NGE, NC) int32
    col_scale: torch.Tensor,  # (K,) fp16
    row_scale: torch.Tensor,  # (N,) fp16
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` from packed codes, on CPU.

    Twin of ``watersic_hf.ops.torch_packed_matmul`` (same signature). ``M <= 16`` runs the
    fused decode-GEMV; larger ``M`` decodes tiles of rows into a reused fp32 buffer and calls
    BLAS (``torch.addmm``). Arithmetic is fp32 (bf16/fp16 activations are converted);
    threads follow ``torch.get_num_threads()``.

    Returns:
        `torch.Tensor` of shape `(M, N)` and dtype ``x.dtype``.
    """
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
    weights = (packed, group_meta, perm, escape_packed, escape_base, col_scale, row_scale)
    if not x.is_cpu:
        raise ValueError("backend='cpu' needs CPU tensors; use backend='auto' on CUDA.")
    if m == 0:
        return x.new_empty(0, n)
    threads = _threads()
    packed_np, meta_np, perm_np, esc_np, base_np, cs_np, rs_np = _numpy_views(weights)
    xf = x.float().contiguous()
    if m <= DECODE_MAX_M:
        has_bias = bias is not None
        bias_np = bias.float().contiguous().numpy() if has_bias else np.zeros(1, np.float32)
        out = np.empty((m, n), np.float32)
        args = (xf.numpy(), packed_np, meta_np, perm_np, esc_np, base_np, cs_np, rs_np, bias_np,
                has_bias, _USE_COMPRESS)
        if threads == 1 or n <= 2 * GROUP:
            _gemv_serial(*args, out)
        elif _GOMP_PARALLEL:
            _gemv_omp(*args, _GOMP_PARALLEL, _gemv_worker.address, threads, out)
        else:
            _gemv_parallel(*args, threads, out)
        y = torch.from_numpy(out)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    # prefill: activations permuted and scaled once, then tiles of decoded rows
    kp = n_groups * GROUP
    xs = torch.from_numpy(_permute_scale(xf.numpy(), perm_np, cs_np, n_groups))
    tile = max(GROUP, min(n, PREFILL_TILE_BYTES // (4 * kp)) // GROUP * GROUP)
    buf = _tile_buffer(kp, tile)
    bias_f = bias.float() if bias is not None else None
    out = torch.empty(m, n, dtype=torch.float32) if tile < n else None
    for n0 in range(0, n, tile):
        nb = min(tile, n - n0)
        tile_args = (packed_np, meta_np, esc_np, base_np, rs_np, _USE_COMPRESS, n0, nb)
        if threads == 1:
            _decode_tile_groups(*tile_args, 0, n_groups, buf.numpy())
        elif _GOMP_PARALLEL:
            _decode_tile_omp(*tile_args, _GOMP_PARALLEL, _tile_worker.address, threads,
                             buf.numpy())
        else:
            _decode_tile_parallel(*tile_args, min(threads, n_groups), buf.numpy())
        codes = buf[:, :nb]  # (Kp, nb): decoded codes · row_scale, permuted column order
        if bias_f is not None:
            part = torch.addmm(bias_f[n0:n0 + nb], xs, codes)
        else:
            part = torch.mm(xs, codes)
        if out is None:
            return part.to(x.dtype)
        out[:, n0:n0 + nb] = part
    return out.to(x.dtype)
