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

from . import _ans, _rans
from ._bits import pack_bits, packed_nbytes, unpack_bits
from ._model import MAX_TABLES, PRECISION, fit_model, parse_model, serialize_model
from ._tokens import ALPHABET, DIRECT_MAX, MAX_TOKEN, escape_join, escape_split, escape_widths
from ._tokens import tokenize as _tokenize

CODEC = "watersic-entropy"
FORMAT_VERSION = 1
SYMBOLS_PER_LANE = 4096
MAX_LANES = 16384
# Measured at 2 bits (docs/benchmarks.md, "Coder choice"): constriction's ANS decodes ~50 M
# codes/s at any size; the lockstep rANS 6 at 576x576, 11 at 1536x576, 54 at 2048x2048 and 79
# at 4096x4096, because each of its steps has a fixed NumPy-call cost.
ANS_MAX_CODES = 1 << 22
CODERS = ("ans", "rans")
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
        coder (`str`, *optional*): ``"ans"`` or ``"rans"``; by default ``"ans"`` below
            ``ANS_MAX_CODES`` (4 M) codes and ``"rans"`` above, the faster decoder in each range.
        lanes (`int`, *optional*): number of interleaved lanes of the ``"rans"`` coder (default
            :func:`default_lanes`). More lanes decode faster and cost 4 bytes each.
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
        coder = "ans" if total < ANS_MAX_CODES and lanes is None else "rans"
    if coder not in CODERS:
        raise ValueError(f"{name}: coder must be one of {CODERS}, got {coder!r}")
    if coder == "ans":
        if lanes is not None:
            raise ValueError(f"{name}: lanes applies to coder='rans' only, got lanes={lanes!r}")
        lanes = 0
    elif lanes is None:
        lanes = default_lanes(total)
    elif not isinstance(lanes, int) or lanes < 1 or (total and lanes > total):
        raise ValueError(f"{name}: lanes must be an int in [1, {max(total, 1)}], got {lanes!r}")
    if not isinstance(max_tables, int) or not 1 <= max_tables <= MAX_TABLES:
        raise ValueError(f"{name}: max_tables must be an int in [1, {MAX_TABLES}], "
                         f"got {max_tables!r}")
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
        "format_version": FORMAT_VERSION,
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


def _check_metadata(meta: Mapping[str, Any], name: str) -> None:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{name}: metadata must be a dict, got {type(meta).__name__}")
    if meta.get("codec") != CODEC:
        raise ValueError(f"{name}: metadata codec is {meta.get('codec')!r}, expected {CODEC!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{name}: entropy-coded codes have format_version {version!r}, but this version of "
            f"watersic_hf reads format_version {FORMAT_VERSION}; install the watersic_hf "
            "version that wrote the checkpoint, or re-quantize")
    bad = [k for k in _META_INT_KEYS if not isinstance(meta.get(k), int) or meta[k] < 0]
    shape = meta.get("shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(s, int) and s >= 0 for s in shape)):
        bad.append("shape")
    crc = meta.get("crc32")
    if not isinstance(crc, Mapping) or not all(isinstance(crc.get(k), int) for k in TENSOR_NAMES):
        bad.append("crc32")
    if bad:
        raise ValueError(f"{name}: metadata has missing or invalid fields {bad}")
    if meta.get("coder") not in CODERS:
        raise ValueError(f"{name}: metadata coder is {meta.get('coder')!r}, expected one of "
                         f"{CODERS}")
    if meta["precision_bits"] != PRECISION:
        raise ValueError(f"{name}: precision_bits {meta['precision_bits']} is not supported "
                         f"(format {FORMAT_VERSION} uses {PRECISION})")
    total = shape[0] * shape[1]
    lanes_ok = meta["lanes"] == 0 if meta["coder"] == "ans" else 1 <= meta["lanes"] <= total
    if total and not (lanes_ok and 1 <= meta["n_tables"] <= MAX_TABLES):
        raise ValueError(f"{name}: metadata lanes={meta['lanes']} / n_tables={meta['n_tables']} "
                         f"are impossible for shape {list(shape)}")
    if meta["coded_nbytes"] + meta["escape_nbytes"] != meta["stream_nbytes"]:
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


def decode_codes(enc: EncodedCodes, *, name: str = "codes") -> torch.Tensor:
    """Decode an [`EncodedCodes`] back to the exact code matrix.

    Args:
        enc ([`EncodedCodes`]): the output of :func:`encode_codes` (possibly rebuilt from a
            checkpoint with :meth:`EncodedCodes.from_tensors`).
        name (`str`, *optional*, defaults to `"codes"`): tensor name used in error messages.

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
    for what, data in (("stream", stream), ("model", model)):
        if _crc(data) != meta["crc32"][what]:
            raise ValueError(f"{name}: checksum mismatch in entropy-coded tensor '{what}' "
                             "(the checkpoint file is corrupted)")
    if a * n == 0:
        return torch.zeros((a, n), dtype=torch.int32)
    try:
        tables, assign = parse_model(model, meta["n_tables"], n)
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
