"""Entropy-coded on-disk format of WaterSIC code matrices (independent of transformers).

    enc = encode_codes(codes)          # codes: int32 (a, n)
    enc.tensors()                      # {"stream": uint8, "model": uint8}
    enc.metadata                       # small JSON-able dict (shape, lengths, CRC-32, version)
    codes2 = decode_codes(enc)         # bit-exact int32 (a, n)

See docs/format.md, section "Entropy-coded streams".
"""

from .codec import (
    CODEC,
    FORMAT_VERSION,
    EncodedCodes,
    decode_codes,
    decode_codes_packed,
    default_lanes,
    encode_codes,
    encoded_nbytes,
    encoded_tensor_specs,
    per_column_entropy_bits,
    pooled_entropy_bits,
)

__all__ = [
    "CODEC",
    "FORMAT_VERSION",
    "EncodedCodes",
    "decode_codes",
    "decode_codes_packed",
    "default_lanes",
    "encode_codes",
    "encoded_nbytes",
    "encoded_tensor_specs",
    "per_column_entropy_bits",
    "pooled_entropy_bits",
]
