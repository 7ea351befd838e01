"""Triton kernels for WaterSICLinear, installed as ``watersic_hf.kernels``.

Only relative imports inside this folder: the top-level name ``kernels`` belongs to Hugging
Face's Kernel Hub distribution and must never be imported or installed from here.
"""

from .entropy_decode import triton_decode_segments
from .packed_matmul import DECODE_MAX_M, triton_packed_matmul

__all__ = ["DECODE_MAX_M", "triton_decode_segments", "triton_packed_matmul"]
