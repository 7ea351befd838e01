"""Single-layer quantizers (torch only): WaterSIC, standard GPTQ, entropy-coded GPTQ and
round-to-nearest.

``watersic_quantize(weight, sigma_x, bits)`` returns a [`QuantizedWeight`] with integer codes
and fp16-exact per-row/per-column scales; see docs/algorithm.md for the algorithm, the rate
accounting and the numerics policy.
"""

from .api import (
    PreparedStatistics,
    gptq_entropy_quantize,
    prepare_statistics,
    redamp,
    rtn_quantize,
    watersic_quantize,
)
from .entropy import column_entropies, mean_column_entropy, pooled_entropy
from .gptq import gptq_quantize
from .stats import find_dead_columns
from .theory import reverse_waterfilling_distortion, reverse_waterfilling_rate
from .weight import QuantizedWeight
from .zsic import zsic, zsic_reference

__all__ = [
    "PreparedStatistics",
    "QuantizedWeight",
    "column_entropies",
    "find_dead_columns",
    "gptq_entropy_quantize",
    "gptq_quantize",
    "mean_column_entropy",
    "pooled_entropy",
    "prepare_statistics",
    "redamp",
    "reverse_waterfilling_distortion",
    "reverse_waterfilling_rate",
    "rtn_quantize",
    "watersic_quantize",
    "zsic",
    "zsic_reference",
]
