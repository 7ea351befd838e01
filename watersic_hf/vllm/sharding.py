"""Tensor-parallel splitting and fused-layer forward of WaterSIC layers (no vLLM import).

vLLM fuses ``q/k/v_proj`` into one ``qkv_proj`` and ``gate/up_proj`` into one ``gate_up_proj``,
and splits layers across tensor-parallel ranks. WaterSIC layers do not fuse into one matrix
without extra work: each stored layer has its own per-column scale. The plugin therefore keeps
**every stored layer as its own packed ``WaterSICLinear`` (a *source*)** inside the fused vLLM
layer and concatenates their outputs (:func:`fused_linear`): the kernels stay unchanged, and a
fused matmul costs one kernel launch per source instead of one.

Tensor parallelism (:class:`ShardPlan`):

* column-parallel layers (``qkv_proj``, ``gate_up_proj``, ...) keep a range of rows of each
  source; rows carry their own scale, so the rows and ``row_scale`` are sliced together;
* row-parallel layers (``o_proj``, ``down_proj``) keep a range of input columns: the codes'
  columns and ``col_scale`` are sliced, the rows are complete.

The packed layout is not split in place (its column permutation mixes columns across the whole
matrix, and its escape counts are per 32-row chunk): a rank **unpacks the codes, slices them and
packs them again** at load (:func:`shard_linear`), so every rank runs the same kernels on a
smaller packed matrix. Codes are exact integers, so the split layer computes the same function as
the rows / columns it was cut from (up to the order of float additions).

Everything here is plain torch plus :mod:`watersic_hf.nn`; ``watersic_hf.vllm.plugin`` calls it
from vLLM's layer hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..nn import WaterSICLinear

__all__ = [
    "ShardPlan",
    "column_parallel_plan",
    "fused_linear",
    "refuse_grouped_layers",
    "row_parallel_plan",
    "shard_linear",
]


@dataclass(frozen=True)
class ShardPlan:
    """Which part of a stored layer one tensor-parallel rank keeps.

    Attributes:
        rows (`tuple[tuple[int, int], ...]` or `None`): ``(start, length)`` ranges of stored
            output rows, concatenated in this order; ``None`` keeps every row.
        cols (`tuple[int, int]` or `None`): ``(start, length)`` of the stored input columns;
            ``None`` keeps every column.
    """

    rows: tuple[tuple[int, int], ...] | None = None
    cols: tuple[int, int] | None = None

    @property
    def is_identity(self) -> bool:
        """True when the rank keeps the whole layer (no repacking needed)."""
        return self.rows is None and self.cols is None


def row_parallel_plan(in_features: int, tp_rank: int, tp_size: int) -> ShardPlan:
    """Plan of a row-parallel layer (input columns split evenly across ranks).

    Args:
        in_features (`int`): the stored layer's input size ``K``.
        tp_rank (`int`), tp_size (`int`): this rank and the number of ranks.

    Returns:
        `ShardPlan` keeping columns ``[tp_rank·K/tp_size, (tp_rank+1)·K/tp_size)``.

    Raises:
        ValueError: ``K`` is not divisible by ``tp_size``, or the rank is out of range.
    """
    _check_rank(tp_rank, tp_size)
    if tp_size == 1:
        return ShardPlan()
    if in_features % tp_size:
        raise ValueError(
            f"in_features={in_features} is not divisible by tensor_parallel_size={tp_size}; "
            "choose a tensor_parallel_size that divides it.")
    part = in_features // tp_size
    return ShardPlan(cols=(tp_rank * part, part))


def column_parallel_plan(out_features: int, partition_sizes: list[int],
                         shard_ranks: list[int]) -> ShardPlan:
    """Plan of a column-parallel layer: each logical segment of the stored rows is split.

    A stored layer holds one logical output (``q_proj``: one segment) or several, when the
    checkpoint itself stores a fused matrix (Phi-3's ``gate_up_proj``: two segments). Segment
    ``i`` has ``partition_sizes[i] · n_i`` rows in the file, and this rank keeps its
    ``shard_ranks[i]``-th slice of ``partition_sizes[i]`` rows (``n_i`` follows from the sizes;
    with grouped-query attention and more ranks than KV heads, several ranks keep the same k/v
    slice, which vLLM expresses as ``shard_rank = tp_rank // num_kv_head_replicas``).

    Args:
        out_features (`int`): the stored layer's number of rows.
        partition_sizes (`list[int]`): rows per rank of each segment (vLLM's
            ``output_partition_sizes`` for the segments this layer covers).
        shard_ranks (`list[int]`): which slice of each segment this rank keeps.

    Returns:
        `ShardPlan` (identity when the rank keeps every row).

    Raises:
        ValueError: the sizes do not add up to the stored rows.
    """
    if len(partition_sizes) != len(shard_ranks) or not partition_sizes:
        raise ValueError(f"partition_sizes={partition_sizes} and shard_ranks={shard_ranks} must "
                         "be non-empty lists of the same length.")
    if len(partition_sizes) == 1:
        segments = [out_features]
    else:
        # several segments in one stored matrix: each is split into the same number of slices
        # (the number of ranks that hold distinct slices), so segment sizes scale with the parts
        total = sum(partition_sizes)
        if out_features % total:
            raise ValueError(
                f"the stored layer has {out_features} rows, which cannot be split into segments "
                f"of per-rank sizes {partition_sizes}; the checkpoint does not match the model.")
        segments = [p * (out_features // total) for p in partition_sizes]
    rows: list[tuple[int, int]] = []
    offset = 0
    for seg, part, rank in zip(segments, partition_sizes, shard_ranks, strict=True):
        if part < 1 or rank < 0 or (rank + 1) * part > seg:
            raise ValueError(
                f"slice {rank} of {part} rows does not fit a segment of {seg} stored rows; the "
                "checkpoint's layer shapes do not match the model's (or the tensor_parallel_size "
                "does not divide them).")
        rows.append((offset + rank * part, part))
        offset += seg
    if rows == [(0, out_features)]:
        return ShardPlan()
    return ShardPlan(rows=tuple(rows))


def shard_linear(module: WaterSICLinear, plan: ShardPlan) -> WaterSICLinear:
    """The part of ``module`` that ``plan`` keeps, packed again.

    Unpacks the codes, slices rows (with ``row_scale``) and columns (with ``col_scale``), and
    packs the result with `watersic_hf.packing.pack_codes` (the in-memory layout cannot be cut
    in place: see the module docstring).

    Args:
        module (`WaterSICLinear`): the whole stored layer, ``(N, K)``, without bias (vLLM adds
            the bias itself, on the right rank).
        plan (`ShardPlan`): what to keep.

    Returns:
        `WaterSICLinear` of shape ``(Σ row lengths, column length)``; ``module`` itself when the
        plan is the identity.
    """
    if plan.is_identity:
        return module
    if module.bias is not None:
        raise ValueError("shard_linear splits the weight only; pass a module without bias "
                         "(the bias is sliced and added by the caller).")
    codes = module.codes()  # (N, K) int32
    col_scale = module.weight_col_scale.detach()
    row_scale = module.weight_row_scale.detach()
    if plan.rows is not None:
        index = torch.cat([torch.arange(s, s + n, device=codes.device) for s, n in plan.rows])
        codes, row_scale = codes.index_select(0, index), row_scale.index_select(0, index)
    if plan.cols is not None:
        start, n = plan.cols
        codes, col_scale = codes[:, start:start + n], col_scale[start:start + n]
    qw = SimpleNamespace(codes=codes.contiguous(), col_scale=col_scale.contiguous(),
                         row_scale=row_scale.contiguous())
    return WaterSICLinear.from_quantized(qw, None, format=module.format, backend=module.backend)


def fused_linear(x: torch.Tensor, sources: list[WaterSICLinear] | nn.ModuleList,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``concat_i(source_i(x)) + bias``: the forward of a fused vLLM layer.

    Args:
        x (`torch.Tensor` of shape `(..., K)`): activations.
        sources: the rank's part of every stored layer, in the fused layer's output order; each
            has its own column scale, which is why they are not one matrix.
        bias (`torch.Tensor` of shape `(Σ N_i,)`, *optional*): the fused layer's bias.

    Returns:
        `torch.Tensor` of shape `(..., Σ N_i)` and dtype ``x.dtype``.
    """
    outs = [source(x) for source in sources]
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _check_rank(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is not a rank of tensor_parallel_size={tp_size}.")


def refuse_grouped_layers(layers: dict[str, Any]) -> None:
    """Refuse a checkpoint whose layers have per-group scales (standard GPTQ with groups).

    Args:
        layers (`dict`): ``quantization_config.layers``.

    Raises:
        ValueError: naming how many layers are grouped, one of them, and what to do instead.
    """
    grouped = sorted(name for name, meta in layers.items()
                     if isinstance(meta, dict) and isinstance(meta.get("layout"), dict)
                     and meta["layout"].get("scale_group_size"))
    if grouped:
        raise ValueError(
            f"{len(grouped)} layer(s) of this checkpoint have per-group scales (standard GPTQ "
            f"with gptq_group_size > 0, e.g. {grouped[0]}); the vLLM plugin runs only the fused "
            "row/column-scale kernels. Serve it with transformers, or quantize again with "
            "gptq_group_size=0 (per-channel) or another method.")
