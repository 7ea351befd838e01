"""The replacement module for quantized linear layers."""

from .linear import WaterSICLinear

__all__ = ["WaterSICLinear"]
