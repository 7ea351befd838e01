"""Checksums of checkpoint tensors (XXH3-64, from the ``xxhash`` package).

Every tensor of a format-v2 WaterSIC checkpoint (code streams, packed words, scales, biases,
embeddings, norms, the LM head) gets the XXH3-64 digest of its bytes as written to the
safetensors file; the digests live in ``config.json`` (``quantization_config.checksums``). On
load, :func:`verify_safetensors_files` hashes the byte range of every tensor in the files (memory
mapped, so nothing is copied) and compares: any flipped byte names the tensor and the file.
XXH3 hashes at several GB/s on one core, so verification costs a fraction of the load time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping

import torch
import xxhash

ALGORITHM = "xxh3_64"

__all__ = [
    "ALGORITHM",
    "digest_bytes",
    "digest_tensor",
    "verify_safetensors_files",
]


def digest_bytes(data: bytes | memoryview) -> str:
    """XXH3-64 of ``data`` as 16 lower-case hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def digest_tensor(t: torch.Tensor) -> str:
    """XXH3-64 of a tensor's bytes in C order, as safetensors writes them (little-endian)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return digest_bytes(b"")
    raw = t.reshape(-1).view(torch.uint8) if t.element_size() > 1 else t.reshape(-1)
    return digest_bytes(memoryview(raw.numpy()).cast("B"))


def _read_header(path: str, handle: mmap.mmap) -> tuple[dict, int]:
    size = len(handle)
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", handle[:8])
    if n > size - 8:
        raise ValueError(f"{path}: the safetensors header length {n} runs past the end of the "
                         "file (corrupted or truncated file)")
    try:
        header = json.loads(bytes(handle[8: 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the safetensors header is not valid JSON (corrupted file): "
                         f"{err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object (corrupted file)")
    return header, 8 + n


def verify_safetensors_files(
    files: Iterable[str | os.PathLike], expected: Mapping[str, str]
) -> int:
    """Check every tensor of ``files`` against ``expected`` digests.

    Args:
        files: the checkpoint's ``.safetensors`` files.
        expected (`dict`): tensor name → XXH3-64 hex digest (``quantization_config.checksums``).

    Returns:
        the number of bytes hashed.

    Raises:
        ValueError: a file is not valid safetensors, a tensor's bytes do not match its digest, a
            tensor in the files has no digest, or a digested tensor is in none of the files. The
            message names the tensor and the file.
    """
    seen: set[str] = set()
    hashed = 0
    for path in map(str, files):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ValueError(f"{path}: empty file (a WaterSIC checkpoint shard is missing "
                                 "its data)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as handle:
                header, data_start = _read_header(path, handle)
                view = memoryview(handle)
                try:
                    for name, info in header.items():
                        if name == "__metadata__":
                            continue
                        if name not in expected:
                            raise ValueError(
                                f"{path}: tensor {name!r} has no checksum in config.json; the "
                                "files and config.json do not belong together")
                        try:
                            begin, end = (int(v) for v in info["data_offsets"])
                        except (KeyError, TypeError, ValueError):
                            raise ValueError(f"{path}: tensor {name!r} has no valid "
                                             "data_offsets (corrupted header)") from None
                        if not 0 <= begin <= end <= size - data_start:
                            raise ValueError(f"{path}: tensor {name!r} points outside the file "
                                             "(corrupted or truncated file)")
                        got = digest_bytes(view[data_start + begin: data_start + end])
                        if got != expected[name]:
                            raise ValueError(
                                f"{path}: tensor {name!r} fails its checksum (xxh3_64 {got}, "
                                f"config.json says {expected[name]}): the file is corrupted; "
                                "download it again")
                        seen.add(name)
                        hashed += end - begin
                finally:
                    view.release()
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"config.json lists checksums of {len(missing)} tensor(s) that are in "
                         f"no checkpoint file, e.g. {missing[:3]}; a shard is missing")
    return hashed
