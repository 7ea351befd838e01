"""Per-group scales of ``WaterSICLinear`` (standard GPTQ): layout key, shapes, torch forward.

A grouped layer stores ``weight_group_scale`` (fp16, shape ``(out, ceil(in / g))``) beside the
per-row and per-column scales, with ``g = layout["scale_group_size"]`` (not ``"group_size"``: the
packed layout already uses that name for its 32-column width groups), and

    Ŵ[r, j] = row_scale[r] · col_scale[j] · group_scale[r, j // g] · codes[r, j].

The fused Triton / numba kernels know only the row and column scales, so grouped layers run the
plain-torch path below (codes unpacked on every call: correct, not fast).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GROUP_KEY", "GROUP_TENSOR", "expand_group_scale", "group_scale_shape", "group_size_of",
           "grouped_matmul"]

GROUP_KEY = "scale_group_size"
"""Layout key of the group size (input columns per group scale)."""
GROUP_TENSOR = "weight_group_scale"
"""Parameter name of the group scales."""


def group_size_of(layout: dict[str, Any]) -> int:
    """``layout["scale_group_size"]``, or 0 when the layout has no group scales.

    Raises:
        ValueError: the value is not a positive int.
    """
    g = layout.get(GROUP_KEY)
    if g is None:
        return 0
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(
            f"layout[{GROUP_KEY!r}]={g!r} must be a positive int (input columns per group "
            "scale); the layer entry in config.json is corrupted or was edited")
    return g


def group_scale_shape(in_features: int, out_features: int, group_size: int) -> tuple[int, int]:
    """Shape ``(out, ceil(in / group_size))`` of ``weight_group_scale``."""
    return (out_features, -(-in_features // group_size))


def expand_group_scale(group_scale: torch.Tensor, group_size: int,
                       in_features: int) -> torch.Tensor:
    """``group_scale[r, j // group_size]`` for every column ``j``: shape ``(out, in)``, fp32."""
    return group_scale.float().repeat_interleave(group_size, dim=1)[:, :in_features]


def grouped_matmul(
    x: torch.Tensor,  # (..., K) float
    codes: torch.Tensor,  # (N, K) int32
    col_scale: torch.Tensor,  # (K,) fp16
    row_scale: torch.Tensor,  # (N,) fp16
    group_scale: torch.Tensor,  # (N, ceil(K / g)) fp16
    group_size: int,
    bias: torch.Tensor | None,  # (N,) any float
) -> torch.Tensor:
    """``y = row_scale · ((x · col_scale) @ (codes ∘ G)ᵀ) + bias`` with ``G`` the expanded group
    scales, in fp32 (a code of at most 8 bits times an fp16 value is exact there).

    Returns:
        `torch.Tensor` of shape `(..., N)` and dtype ``x.dtype``.
    """
    k = codes.shape[1]
    scaled = codes.float() * expand_group_scale(group_scale, group_size, k)
    y = torch.matmul(x.float() * col_scale.float(), scaled.t()) * row_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
