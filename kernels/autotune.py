"""Autotuning configurations for the packed WaterSIC matmul kernels.

Two families, like the Triton matmul tutorial's per-vendor lists:

* decode (``M <= 16``): ``BLOCK_N`` × ``SPLIT_K`` (split-K spreads a skinny matrix over the SMs;
  partial sums meet through fp32 atomics) × ``GPS`` × warps;
* prefill (``M > 16``): ``BLOCK_M`` × ``BLOCK_N`` × ``GPS`` × warps, no split-K.

The K step is ``GPS`` groups of the format's 32 columns (``BLOCK_K = 32·GPS``); one width per
group is what makes a group the natural unit. ``WATERSIC_AUTOTUNE=max`` widens both lists
(slower first call per shape). The early-prune functions drop tiles far larger than the
problem and splits larger than the number of K steps, as gemlite does, so small layers do not
time configs that only add masked work."""

from __future__ import annotations

import os
from typing import Any

from .._triton import triton

__all__ = ["decode_configs", "early_prune_decode", "early_prune_prefill", "prefill_configs"]

_ESCAPE_CHUNK = 32  # BLOCK_N must be a multiple of the format's escape row chunk


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _max_tier() -> bool:
    return os.environ.get("WATERSIC_AUTOTUNE", "default").lower() == "max"


def decode_configs() -> list[Any]:
    """Configs for the decode kernel (``M <= 16``)."""
    if _max_tier():
        grid = [(bn, sk, gps, w, s) for bn in (32, 64, 128, 256) for sk in (1, 2, 4, 8, 16)
                for gps in (1, 2, 4) for w in (2, 4, 8) for s in (1, 2, 3)]
    else:
        grid = [(bn, sk, gps, w, 2) for bn in (32, 64, 128) for sk in (1, 4, 8, 16)
                for gps in (1, 2) for w in (2, 4, 8)]
    configs = [
        triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, "GPS": gps}, num_warps=w, num_stages=s)
        for bn, sk, gps, w, s in grid
    ]
    return [c for c in configs if _fits(c)]


def prefill_configs() -> list[Any]:
    """Configs for the prefill kernel (``M > 16``)."""
    if _max_tier():
        grid = [(bm, bn, gps, w, s) for bm in (16, 32, 64, 128, 256) for bn in (32, 64, 128, 256)
                for gps in (1, 2, 4) for w in (4, 8) for s in (2, 3, 4)]
    else:
        grid = [(bm, bn, gps, w, 3) for bm in (32, 64, 128) for bn in (32, 64, 128)
                for gps in (1, 2) for w in (4, 8)]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GPS": gps}, num_warps=w, num_stages=s)
        for bm, bn, gps, w, s in grid
    ]
    return [
        c for c in configs
        if _fits(c, big_m=c.kwargs["BLOCK_M"] >= 128)
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 8192
        and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["GPS"], c.num_warps)
        not in _PREFILL_SPILLS
    ]


def _clip_n(configs: list[Any], n: int) -> list[Any]:
    cap = max(_ESCAPE_CHUNK, _next_pow2(n))
    return [c for c in configs if c.kwargs["BLOCK_N"] <= cap]


# (BLOCK_M, BLOCK_N, GPS, warps) of prefill configs that spilled registers in sm_90 builds
# (benchmarks/bench_kernels.py, compile report) although they pass the general rules below
_PREFILL_SPILLS = {(128, 32, 2, 4), (128, 64, 1, 4), (128, 64, 2, 8), (32, 32, 2, 8)}


def _fits(config: Any, big_m: bool = False) -> bool:
    """At most 16 decoded codes per thread and step, and 8 warps only for a full decode tile
    (16 codes per thread) or a 128-row prefill tile: other configs made ptxas spill in sm_90
    builds (see the compile report of benchmarks/bench_kernels.py)."""
    per_thread = config.kwargs["GPS"] * config.kwargs["BLOCK_N"] / config.num_warps
    return per_thread <= 16 and (config.num_warps < 8 or per_thread >= 16 or big_m)


def _dedupe(configs: list[Any]) -> list[Any]:
    seen, out = set(), []
    for c in configs:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def early_prune_decode(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop decode configs whose tile exceeds ``N`` or whose split exceeds the group count."""
    steps = named_args["NG"]
    kept = [
        c for c in _clip_n(configs, named_args["N"])
        if c.kwargs["SPLIT_K"] <= -(-steps // c.kwargs["GPS"])
    ]
    return _dedupe(kept) or configs[:1]


def early_prune_prefill(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop prefill configs whose tiles exceed the problem (``M`` rounded up to a power of two)."""
    m_cap = max(16, _next_pow2(named_args["M"]))
    kept = [c for c in _clip_n(configs, named_args["N"]) if c.kwargs["BLOCK_M"] <= m_cap]
    return _dedupe(kept) or configs[:1]
