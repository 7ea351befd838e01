"""Entropy coding of WaterSIC integer code matrices (the on-disk format of the codes).

``encode_codes`` turns an int32 matrix ``Z`` of shape ``(a, n)`` into two uint8 tensors plus a
small JSON-able metadata dict; ``decode_codes`` inverts it bit-exactly. See docs/format.md,
section "Entropy-coded streams", for the byte layout and the measured sizes.

* Model: up to 64 token tables shared by the columns, one table per column, chosen by the
  encoder to minimise stream + side information (``_model``). Codes with ``|z| > 31`` are
  escapes: a token carries their octave, the low bits are stored raw (``_tokens``).
* Coder: ``"ans"`` (one constriction ANS stream, tables decoded run by run, ``_ans``) below
  ``ANS_MAX_CODES`` codes, ``"rans"`` (interleaved rANS over ``L`` lanes decoded in lockstep
  with vectorised NumPy, ``_rans``) above: each is the faster decoder in its range.
* Integrity: CRC-32 of each tensor in the metadata, exact length checks and the rANS
  end-state check; any mismatch raises ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import packing
from . import _ans, _rans, _segments
from ._bits import pack_bits, packed_nbytes, unpack_bits
from ._model import MAX_TABLES, PRECISION, fit_model, parse_model, serialize_model
from ._tokens import ALPHABET, DIRECT_MAX, MAX_TOKEN, escape_join, escape_split, escape_widths
from ._tokens import tokenize as _tokenize

CODEC = "watersic-entropy"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SYMBOLS_PER_LANE = 4096
MAX_LANES = 16384
# Measured at 2 bits (docs/benchmarks.md, "Coder choice"): constriction's ANS decodes ~50 M
# codes/s at any size; the lockstep rANS 6 at 576x576, 11 at 1536x576, 54 at 2048x2048 and 79
# at 4096x4096, because each of its steps has a fixed NumPy-call cost.
ANS_MAX_CODES = 1 << 22
CODERS = ("ans", "rans", "segments")
V1_CODERS = ("ans", "rans")
TENSOR_NAMES = ("stream", "model")
_META_INT_KEYS = (
    "lanes", "n_tables", "precision_bits", "coded_nbytes", "escape_nbytes", "n_escapes",
    "stream_nbytes", "model_nbytes",
)
_HIST_CHUNK = 1 << 22  # codes per histogram chunk (bounds the temporary int64 keys)


@dataclass
class EncodedCodes:
    """An entropy-coded code matrix.

    Attributes:
        stream (`torch.Tensor` of shape `(metadata["stream_nbytes"],)`, uint8): the
            entropy-coded tokens (``metadata["coded_nbytes"]`` bytes, coder
            ``metadata["coder"]``) followed by the raw escape bits.
        model (`torch.Tensor` of shape `(metadata["model_nbytes"],)`, uint8): the token
            tables and the packed table index of every column.
        metadata (`dict`): JSON-able description (ints, strings, lists); everything needed to
            allocate the tensors (see :func:`encoded_tensor_specs`) and to check them.
    """

    stream: torch.Tensor
    model: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(a, n)`` of the decoded code matrix."""
        a, n = self.metadata["shape"]
        return int(a), int(n)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``"stream"``, ``"model"``), e.g. for a state dict."""
        return {"stream": self.stream, "model": self.model}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> EncodedCodes:
        """Rebuild from :meth:`tensors` and the metadata (e.g. after loading a checkpoint)."""
        missing = [k for k in TENSOR_NAMES if k not in tensors]
        if missing:
            raise ValueError(f"EncodedCodes.from_tensors: missing tensors {missing}; "
                             f"expected {list(TENSOR_NAMES)}")
        return cls(stream=tensors["stream"], model=tensors["model"], metadata=dict(metadata))


def default_lanes(total: int) -> int:
    """Number of rANS lanes for ``total`` codes: one per ~4096 codes, at most 16384.

    Each lane costs about 3–4 bytes (its flushed state), so this keeps the lane overhead near
    0.006 bit per code while giving the vectorised decoder wide steps on large matrices.
    """
    return int(min(MAX_LANES, max(1, total // SYMBOLS_PER_LANE)))


def encoded_tensor_specs(
    metadata: Mapping[str, Any],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the tensors of an :class:`EncodedCodes` with this metadata.

    Lets a loader allocate empty parameters before reading a checkpoint.

    Returns:
        `dict`: ``{"stream": ((stream_nbytes,), torch.uint8), "model": ((model_nbytes,),
        torch.uint8)}``.
    """
    _check_metadata(metadata, "codes")
    return {
        "stream": ((int(metadata["stream_nbytes"]),), torch.uint8),
        "model": ((int(metadata["model_nbytes"]),), torch.uint8),
    }


def encoded_nbytes(enc: EncodedCodes) -> int:
    """Bytes of every tensor of ``enc`` (the metadata dict is not counted; it is ~300 bytes of
    JSON that a checkpoint stores once per layer in its config)."""
    return sum(t.numel() * t.element_size() for t in enc.tensors().values())


def pooled_entropy_bits(codes: torch.Tensor) -> float:
    """Plug-in entropy (bits per code) of one histogram over all of ``codes`` (paper's rate)."""
    from watersic_hf.algorithm.entropy import pooled_entropy

    return pooled_entropy(codes)


def per_column_entropy_bits(codes: torch.Tensor) -> float:
    """Mean over columns of each column's plug-in entropy (bits per code), ``codes`` (a, n)."""
    from watersic_hf.algorithm.entropy import mean_column_entropy

    return mean_column_entropy(codes)


def _codes_to_numpy(codes: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"{name}: codes must be 2-D (out_features, in_features), "
                         f"got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"{name}: codes must have an integer dtype (int32), got {codes.dtype}")
    codes = codes.detach().cpu()
    if codes.dtype != torch.int32:
        if codes.numel() and (int(codes.min()) < -(2**31) or int(codes.max()) >= 2**31):
            raise ValueError(f"{name}: codes do not fit in int32 (range {int(codes.min())}.."
                             f"{int(codes.max())}); WaterSIC codes are int32")
        codes = codes.to(torch.int32)
    return np.ascontiguousarray(codes.numpy())


def _column_histograms(tokens: np.ndarray) -> np.ndarray:
    """Token histogram of each column, shape ``(n, ALPHABET)``, int64."""
    a, n = tokens.shape
    hist = np.zeros(n * ALPHABET, dtype=np.int64)
    col_key = np.arange(n, dtype=np.int64) * ALPHABET + MAX_TOKEN
    rows = max(1, _HIST_CHUNK // max(n, 1))
    for r0 in range(0, a, rows):
        keys = tokens[r0: r0 + rows].astype(np.int64) + col_key
        hist += np.bincount(keys.reshape(-1), minlength=n * ALPHABET)
    return hist.reshape(n, ALPHABET)


def _crc(data: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(data))) & 0xFFFFFFFF


def _digest(data: np.ndarray) -> str:
    from .checksum import digest_bytes

    return digest_bytes(memoryview(np.ascontiguousarray(data)).cast("B"))


def _check_digests(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], name: str) -> None:
    for what, data in arrays.items():
        if meta["format_version"] == 1:
            ok = _crc(data) == meta["crc32"][what]
        else:
            ok = _digest(data) == meta["xxh3_64"][what]
        if not ok:
            raise ValueError(f"{name}: checksum mismatch in entropy-coded tensor '{what}' "
                             "(the checkpoint file is corrupted)")


def encode_codes(
    codes: torch.Tensor, *, name: str = "codes", coder: str | None = None,
    lanes: int | None = None, max_tables: int = MAX_TABLES,
) -> EncodedCodes:
    """Entropy-code an integer code matrix.

    Args:
        codes (`torch.Tensor` of shape `(a, n)`): integer codes (int32, or any integer dtype
            whose values fit int32). Any values are accepted, including ``±2**31``-range
            outliers, all-zero columns and ``a == 1`` or ``n == 1``.
        name (`str`, *optional*, defaults to `"codes"`): tensor name used in error messages.
        coder (`str`, *optional*, defaults to ``"segments"``): ``"segments"`` writes format
            version 2 (segmented rANS, decoded in parallel by compiled code; what checkpoints
            use). ``"ans"`` and ``"rans"`` write format version 1 (kept so that version-1 files
            can be produced and tested).
        lanes (`int`, *optional*): lanes of the version-1 ``"rans"`` coder (default
            :func:`default_lanes`). Version 2 fixes its lanes from the shape.
        max_tables (`int`, *optional*, defaults to 64): most token tables the encoder may use
            (1 = one pooled table for the whole matrix; 1..64).

    Returns:
        [`EncodedCodes`]: uint8 ``stream`` and ``model`` tensors and the metadata. The same
        codes always give byte-identical tensors.
    """
    z = _codes_to_numpy(codes, name)
    a, n = z.shape
    total = a * n
    if coder is None:
        coder = "segments" if lanes is None else "rans"
    if coder not in CODERS:
        raise ValueError(f"{name}: coder must be one of {CODERS}, got {coder!r}")
    if coder != "rans" and lanes is not None:
        raise ValueError(f"{name}: lanes applies to coder='rans' only, got lanes={lanes!r}")
    if coder == "ans":
        lanes = 0
    elif coder == "rans" and lanes is None:
        lanes = default_lanes(total)
    elif coder == "rans" and (not isinstance(lanes, int) or lanes < 1
                              or (total and lanes > total)):
        raise ValueError(f"{name}: lanes must be an int in [1, {max(total, 1)}], got {lanes!r}")
    if not isinstance(max_tables, int) or not 1 <= max_tables <= MAX_TABLES:
        raise ValueError(f"{name}: max_tables must be an int in [1, {MAX_TABLES}], "
                         f"got {max_tables!r}")
    if coder == "segments":
        return _encode_v2(z, max_tables)
    if total == 0:
        stream = np.zeros(0, dtype=np.uint8)
        model = np.zeros(0, dtype=np.uint8)
        n_tables = coded_nbytes = n_escapes = 0
        lanes = 0
        coder = "ans"
    else:
        tokens, escapes = _tokenize(z)
        tables, assign, _ = fit_model(_column_histograms(tokens), max_tables)
        if coder == "ans":
            coded = _ans.encode(tokens, assign, tables)
        else:
            coded = _rans.encode(tokens, assign, tables, lanes)
        _, raw, width = escape_split(z.reshape(-1)[escapes])
        stream = np.concatenate([coded, pack_bits(raw, width)])
        model = serialize_model(tables, assign)
        n_tables, coded_nbytes, n_escapes = len(tables), coded.size, escapes.size
    metadata: dict[str, Any] = {
        "codec": CODEC,
        "format_version": 1,
        "coder": coder,
        "shape": [a, n],
        "precision_bits": PRECISION,
        "lanes": lanes,
        "n_tables": n_tables,
        "coded_nbytes": int(coded_nbytes),
        "escape_nbytes": int(stream.size - coded_nbytes),
        "n_escapes": int(n_escapes),
        "stream_nbytes": int(stream.size),
        "model_nbytes": int(model.size),
        "crc32": {"stream": _crc(stream), "model": _crc(model)},
    }
    return EncodedCodes(
        stream=torch.from_numpy(stream), model=torch.from_numpy(model), metadata=metadata)


def _encode_v2(z: np.ndarray, max_tables: int) -> EncodedCodes:
    """Format version 2: segmented rANS (see ``_segments``)."""
    a, n = z.shape
    if a * n == 0:
        stream = np.zeros(0, dtype=np.uint8)
        model = np.zeros(0, dtype=np.uint8)
        n_tables = coded_nbytes = n_escapes = header = 0
    else:
        tokens, hist = _segments.tokens_and_histograms(z)
        escapes = np.flatnonzero(np.abs(tokens.reshape(-1)) > DIRECT_MAX)
        tables, assign, _ = fit_model(hist, max_tables)
        coded, seg_off = _segments.encode(tokens, assign, tables)
        _, raw, width = escape_split(z.reshape(-1)[escapes])
        esc_off = _segments.escape_offsets(escapes // n, width, a, n)
        head = np.concatenate([seg_off, esc_off]).astype("<u4").view(np.uint8)
        stream = np.concatenate([head, coded, pack_bits(raw, width)])
        model = serialize_model(tables, assign)
        n_tables, coded_nbytes, n_escapes = len(tables), coded.size, escapes.size
        header = head.size
    metadata: dict[str, Any] = {
        "codec": CODEC,
        "format_version": 2,
        "coder": "segments",
        "shape": [a, n],
        "precision_bits": PRECISION,
        "lanes": 0,
        "segment_rows": _segments.segment_rows(n),
        "n_tables": n_tables,
        "header_nbytes": int(header),
        "coded_nbytes": int(coded_nbytes),
        "escape_nbytes": int(stream.size - coded_nbytes - header),
        "n_escapes": int(n_escapes),
        "stream_nbytes": int(stream.size),
        "model_nbytes": int(model.size),
        "xxh3_64": {"stream": _digest(stream), "model": _digest(model)},
    }
    return EncodedCodes(
        stream=torch.from_numpy(stream), model=torch.from_numpy(model), metadata=metadata)


def _check_metadata(meta: Mapping[str, Any], name: str) -> None:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{name}: metadata must be a dict, got {type(meta).__name__}")
    if meta.get("codec") != CODEC:
        raise ValueError(f"{name}: metadata codec is {meta.get('codec')!r}, expected {CODEC!r}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{name}: entropy-coded codes have format_version {version!r}, but this version of "
            f"watersic_hf reads format versions {list(READABLE_VERSIONS)}; install the "
            "watersic_hf version that wrote the checkpoint, or re-quantize")
    int_keys = _META_INT_KEYS + (("segment_rows", "header_nbytes") if version == 2 else ())
    bad = [k for k in int_keys if not isinstance(meta.get(k), int) or meta[k] < 0]
    shape = meta.get("shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(s, int) and s >= 0 for s in shape)):
        bad.append("shape")
    digest_key, digest_type = ("crc32", int) if version == 1 else ("xxh3_64", str)
    digests = meta.get(digest_key)
    if not isinstance(digests, Mapping) or not all(
            isinstance(digests.get(k), digest_type) for k in TENSOR_NAMES):
        bad.append(digest_key)
    if bad:
        raise ValueError(f"{name}: metadata has missing or invalid fields {bad}")
    coders = V1_CODERS if version == 1 else ("segments",)
    if meta.get("coder") not in coders:
        raise ValueError(f"{name}: metadata coder is {meta.get('coder')!r}, expected one of "
                         f"{coders}")
    if meta["precision_bits"] != PRECISION:
        raise ValueError(f"{name}: precision_bits {meta['precision_bits']} is not supported "
                         f"(the format uses {PRECISION})")
    total = shape[0] * shape[1]
    if version == 1:
        lanes_ok = meta["lanes"] == 0 if meta["coder"] == "ans" else 1 <= meta["lanes"] <= total
        header = 0
    else:
        # The format fixes the segment size and lane counts, so a crafted header cannot make
        # decoding take more than a bounded amount of work per code.
        lanes_ok = meta["lanes"] == 0 and meta["segment_rows"] == _segments.segment_rows(shape[1])
        header = _segments.header_nbytes(shape[0], shape[1]) if total else 0
        if meta["header_nbytes"] != header:
            raise ValueError(f"{name}: metadata header_nbytes={meta['header_nbytes']} is "
                             f"impossible for shape {list(shape)} (expected {header})")
    if total and not (lanes_ok and 1 <= meta["n_tables"] <= MAX_TABLES):
        raise ValueError(f"{name}: metadata lanes={meta['lanes']} / n_tables={meta['n_tables']} "
                         f"are impossible for shape {list(shape)}")
    if header + meta["coded_nbytes"] + meta["escape_nbytes"] != meta["stream_nbytes"]:
        raise ValueError(f"{name}: metadata stream lengths do not add up")


def _tensor_bytes(t: Any, expected: int, what: str, name: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: entropy-coded tensor '{what}' must be a 1-D uint8 tensor, "
                         f"got {desc}")
    if t.numel() != expected:
        raise ValueError(f"{name}: entropy-coded tensor '{what}' has {t.numel()} bytes but the "
                         f"metadata says {expected} (truncated or mismatched checkpoint)")
    return np.ascontiguousarray(t.detach().cpu().numpy())


def decode_codes(enc: EncodedCodes, *, name: str = "codes", verify: bool = True) -> torch.Tensor:
    """Decode an [`EncodedCodes`] back to the exact code matrix.

    Args:
        enc ([`EncodedCodes`]): the output of :func:`encode_codes` (possibly rebuilt from a
            checkpoint with :meth:`EncodedCodes.from_tensors`).
        name (`str`, *optional*, defaults to `"codes"`): tensor name used in error messages.
        verify (`bool`, *optional*, defaults to `True`): check the tensors' checksums from the
            metadata (a checkpoint loader that already verified the file bytes skips this).

    Returns:
        `torch.Tensor` of shape `(a, n)`, int32, contiguous, on CPU.

    Raises:
        ValueError: unknown format version, inconsistent metadata, wrong tensor lengths, a
            checksum mismatch, or a stream that does not decode cleanly (corruption).
    """
    meta = enc.metadata
    _check_metadata(meta, name)
    a, n = (int(s) for s in meta["shape"])
    stream = _tensor_bytes(enc.stream, meta["stream_nbytes"], "stream", name)
    model = _tensor_bytes(enc.model, meta["model_nbytes"], "model", name)
    if verify:
        _check_digests(meta, {"stream": stream, "model": model}, name)
    if a * n == 0:
        return torch.zeros((a, n), dtype=torch.int32)
    try:
        tables, assign = parse_model(model, meta["n_tables"], n)
        if meta["format_version"] == 2:
            return torch.from_numpy(_decode_v2(stream, meta, tables, assign, a, n))
        coded = stream[: meta["coded_nbytes"]]
        if meta["coder"] == "ans":
            tokens = _ans.decode(coded, (a, n), assign, tables)
        else:
            tokens = _rans.decode(coded, (a, n), assign, tables, meta["lanes"])
        _apply_escapes(tokens.reshape(a, n), tables, assign, stream[meta["coded_nbytes"]:],
                       meta["n_escapes"])
    except ValueError as err:
        raise ValueError(f"{name}: entropy-coded codes do not decode: {err}") from err
    return torch.from_numpy(tokens.reshape(a, n))


def decode_codes_on_device(enc: EncodedCodes, device: torch.device, *,
                           name: str = "codes") -> torch.Tensor:
    """Decode a format-2 [`EncodedCodes`] on a GPU with the Triton kernel.

    Only the compressed bytes are copied to ``device`` (if they are not there already); the
    small model (tables) is parsed on the CPU. The checksums are not checked here: a checkpoint
    loader verifies the file bytes before loading.

    Returns:
        `torch.Tensor` of shape `(a, n)`, int32, on ``device``.

    Raises:
        ValueError: as :func:`decode_codes`; also for a format-1 stream.
    """
    meta = enc.metadata
    _check_metadata(meta, name)
    if meta["format_version"] != 2:
        raise ValueError(f"{name}: only format-2 streams decode on the GPU")
    a, n = (int(s) for s in meta["shape"])
    if enc.stream.dim() != 1 or enc.stream.numel() != meta["stream_nbytes"]:
        raise ValueError(f"{name}: entropy-coded tensor 'stream' has {enc.stream.numel()} bytes "
                         f"but the metadata says {meta['stream_nbytes']}")
    model = _tensor_bytes(enc.model, meta["model_nbytes"], "model", name)
    if a * n == 0:
        return torch.zeros((a, n), dtype=torch.int32, device=device)
    header = meta["header_nbytes"]
    head = _tensor_bytes(enc.stream[:header].cpu(), header, "stream", name)
    try:
        tables, assign = parse_model(model, meta["n_tables"], n)
        seg_off, esc_off = _segment_header(head, meta, meta["stream_nbytes"] - header)
        stream = enc.stream.to(device)
        coded = stream[header: header + meta["coded_nbytes"]]
        escapes = stream[header + meta["coded_nbytes"]:]
        return _segments.decode_on_device(coded, seg_off, escapes, esc_off, (a, n), assign,
                                          tables)
    except ValueError as err:
        raise ValueError(f"{name}: entropy-coded codes do not decode: {err}") from err


def _segment_header(head: np.ndarray, meta: Mapping[str, Any],
                    body_nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment byte offsets and escape bit offsets from a format-2 stream header, checked."""
    n_seg = meta["header_nbytes"] // 8 - 1
    offsets = head.view("<u4").astype(np.int64)
    seg_off, esc_off = offsets[: n_seg + 1], offsets[n_seg + 1:]
    coded_n = meta["coded_nbytes"]
    esc_bytes = body_nbytes - coded_n
    if (seg_off[0] != 0 or seg_off[-1] != coded_n or np.any(np.diff(seg_off) < 0)
            or esc_off[0] != 0 or -(-int(esc_off[-1]) // 8) != esc_bytes
            or np.any(np.diff(esc_off) < 0)):
        raise ValueError("the segment header is inconsistent with the stream lengths")
    return seg_off, esc_off


def _v2_parts(stream: np.ndarray, meta: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """``(coded, seg_off, escapes, esc_off)`` of a format-2 stream, header checked."""
    header = meta["header_nbytes"]
    coded_n = meta["coded_nbytes"]
    seg_off, esc_off = _segment_header(stream[:header], meta, stream.size - header)
    return stream[header: header + coded_n], seg_off, stream[header + coded_n:], esc_off


def _decode_v2(stream: np.ndarray, meta: Mapping[str, Any], tables: list, assign: np.ndarray,
               a: int, n: int) -> np.ndarray:
    return _segments.decode(*_v2_parts(stream, meta), (a, n), assign, tables)


def decode_codes_packed(enc: EncodedCodes, group_meta: np.ndarray, layout: Mapping[str, Any],
                        *, name: str) -> dict[str, torch.Tensor]:
    """Decode a format-2 [`EncodedCodes`] whose codes are in packed column order straight into
    the packed tensors of a stored layout, segment by segment (no whole int32 code matrix).

    The checksums are not checked here: a checkpoint loader verifies the file bytes first.

    Args:
        group_meta (`np.ndarray` of shape `(NG, 8)`, int64): the stored group table, validated
            (``layout.validate_layout``).
        layout (`Mapping`): the layer's packed layout entry.
        name (`str`): the module's name; stream errors name ``<name>.codes_stream``.

    Returns:
        ``weight_packed`` `(W, N)`, ``weight_escape_packed`` `(WE,)` and ``weight_escape_base``
        `(NGE, NC)`, int32 CPU tensors (as ``packing.pack_with_layout``).

    Raises:
        ValueError: as :func:`decode_codes`, or the codes do not fit the stored layout.
    """
    meta = enc.metadata
    stream_name = f"{name}.codes_stream"
    _check_metadata(meta, stream_name)
    if meta["format_version"] != 2:
        raise ValueError(f"{stream_name}: only format-2 streams decode into a stored layout")
    a, n = (int(s) for s in meta["shape"])
    stream = _tensor_bytes(enc.stream, meta["stream_nbytes"], "stream", stream_name)
    model = _tensor_bytes(enc.model, meta["model_nbytes"], "model", stream_name)
    target = packing.pack_target(a, group_meta, layout)
    if a * n:
        try:
            tables, assign = parse_model(model, meta["n_tables"], n)
            _segments.decode_pack(*_v2_parts(stream, meta), (a, n), assign, tables, group_meta,
                                  target)
        except ValueError as err:
            raise ValueError(f"{stream_name}: entropy-coded codes do not decode: {err}") from err
    return packing.finish_packing(target, 0, group_meta, layout, name=name)


def _apply_escapes(
    out: np.ndarray, tables: list, assign: np.ndarray, raw_bytes: np.ndarray, n_escapes: int
) -> None:
    """Replace escape tokens in ``out`` (a, n) in place by their full values.

    Only tables whose range reaches past ±31 can produce escape tokens, so only their columns
    are scanned when they are few; otherwise the whole matrix is scanned in one pass.
    """
    a, n = out.shape
    has_escape = np.array([t.lo < -DIRECT_MAX or t.hi > DIRECT_MAX for t in tables])
    cols = np.flatnonzero(has_escape[assign])
    if cols.size == 0:
        rows = col_idx = np.zeros(0, dtype=np.int64)
    elif 4 * cols.size <= n:
        sub = out[:, cols]
        rows, sub_cols = np.nonzero((sub + DIRECT_MAX).view(np.uint32) > 2 * DIRECT_MAX)
        col_idx = cols[sub_cols]
    else:
        # (t + 31) as uint32 exceeds 62 exactly when |t| > 31; flat order is row-major.
        flat = np.flatnonzero((out.reshape(-1) + DIRECT_MAX).view(np.uint32) > 2 * DIRECT_MAX)
        rows, col_idx = np.divmod(flat, n)
    found = rows.size
    if found != n_escapes:
        raise ValueError(f"found {found} escape codes, metadata says {n_escapes}")
    if found == 0:
        if raw_bytes.size:
            raise ValueError("escape bytes present but no escape codes")
        return
    tok = out[rows, col_idx]
    widths = escape_widths(tok)
    if raw_bytes.size != packed_nbytes(widths):
        raise ValueError(f"escape payload has {raw_bytes.size} bytes, expected "
                         f"{packed_nbytes(widths)}")
    values = escape_join(tok, unpack_bits(raw_bytes, widths))
    out[rows, col_idx] = values.astype(np.int32)
