"""Per-block state and the group plan of the calibration engine.

A :class:`BlockContext` holds everything one block's calibration reads (the block, its Linears,
the activation caches of both paths, the per-batch keyword arguments, the devices). A
:class:`BlockPlan` says, per group of Linears that share an input, which statistics the group
needs; it is derived once from the discovered
:class:`~watersic_hf.integration.blocks.BlockStructure` and the configuration, so that no later
stage re-derives flags from the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks import BlockInputs, BlockStructure, move_to

__all__ = [
    "BlockContext",
    "BlockPlan",
    "DeviceKwargs",
    "GroupStep",
    "LayerStats",
    "make_plan",
]


@dataclass
class LayerStats:
    """Statistics handed to the single-layer quantizer (all fp64, on the compute device).

    ``sigma_x`` (``(n, n)``) is always set; ``sigma_xhat`` / ``sigma_x_xhat`` (``(n, n)``) and
    ``sigma_residual`` (``(rows, n)``) are None in plain mode.
    """

    sigma_x: torch.Tensor
    sigma_xhat: torch.Tensor | None = None
    sigma_x_xhat: torch.Tensor | None = None
    sigma_residual: torch.Tensor | None = None


@dataclass(frozen=True)
class GroupStep:
    """One group of Linears that read the same input, and what its statistics need.

    Attributes:
        index (`int`): position in the block's call order.
        names (`tuple[str, ...]`): the Linears, relative to the block, in call order.
        first (`str`): ``names[0]``; its input is the group's input.
        next_first (`str` or None): first Linear of the next group (the adaptive-ε search
            measures the error at its input).
        last (`bool`): the last group of the block.
        weighted (`bool`): attention-weighted statistics (the group feeds the attention and the
            float pass probes it).
        residual (`str` or None): ``"attn"`` / ``"mlp"`` when residual compensation applies.
        adaptive (`bool`): choose ``(ε_q, ε_a)`` by search instead of the fixed mix.
    """

    index: int
    names: tuple[str, ...]
    first: str
    next_first: str | None
    last: bool
    weighted: bool
    residual: str | None
    adaptive: bool


@dataclass(frozen=True)
class BlockPlan:
    """The groups of one block, in call order, plus block-wide facts.

    Attributes:
        groups (`tuple[GroupStep, ...]`): the groups.
        float_path (`bool`): a float pass runs (drift, residual compensation or attention weights).
        attn_linear (`str` or None): the Linear whose output is added to the block input (the
            ``"mlp"`` residual needs its output on both paths).
    """

    groups: tuple[GroupStep, ...]
    float_path: bool
    attn_linear: str | None
    mlp_linear: str | None = None
    exact_residual: bool = False

    @property
    def needs_attention_weights(self) -> bool:
        return any(g.weighted for g in self.groups)

    @property
    def next_from_parts(self) -> bool:
        """The next quantized cache is ``(h + y_attn) + y_mlp`` from kept parts (no block call):
        the block adds its Linears' outputs exactly so, the ``"mlp"`` Linear is the last group
        and the ``"attn"`` one is final before it."""
        if not (self.exact_residual and self.attn_linear and self.mlp_linear and self.groups):
            return False
        last = self.groups[-1]
        return last.names == (self.mlp_linear,) and self.attn_linear not in last.names

    @property
    def needs_attn_output(self) -> bool:
        return self.attn_linear is not None and any(g.residual == "mlp" for g in self.groups)


def make_plan(
    structure: BlockStructure, config: Any, *, float_path: bool, probed: bool
) -> BlockPlan:
    """Derive the plan of one block from its structure and the configuration.

    Args:
        structure: the discovered groups of the block.
        config (`WaterSICConfig`): method and feature switches.
        float_path (`bool`): whether a float pass runs for this block.
        probed (`bool`): whether the block's attention can be probed for attention weights.
    """
    watersic = config.method == "watersic"
    groups = structure.groups
    attn_linear = next((g.names[0] for g in groups if g.residual == "attn"), None)
    mlp_linear = next((g.names[0] for g in groups if g.residual == "mlp"), None)
    steps = []
    for i, g in enumerate(groups):
        nxt = groups[i + 1].names[0] if i + 1 < len(groups) else None
        weighted = bool(config.attention_weighted and g.attention_input and probed and float_path)
        compensate = config.residual_compensation and watersic and float_path
        residual = g.residual if compensate else None
        if residual == "mlp" and attn_linear is None:
            residual = None  # no attention output to pair: no residual statistics (as before)
        adaptive = bool(
            watersic and config.adaptive_eps_on and weighted and config.drift and nxt is not None
        )
        steps.append(
            GroupStep(
                index=i,
                names=tuple(g.names),
                first=g.names[0],
                next_first=nxt,
                last=i == len(groups) - 1,
                weighted=weighted,
                residual=residual,
                adaptive=adaptive,
            )
        )
    return BlockPlan(groups=tuple(steps), float_path=float_path, attn_linear=attn_linear,
                     mlp_linear=mlp_linear,
                     exact_residual=bool(getattr(structure, "residual_exact", False)))


class DeviceKwargs(Sequence[dict[str, Any]]):
    """Block kwargs per batch, moved to the compute device only when used (masks can be large)."""

    def __init__(self, inputs: BlockInputs, block_idx: int, device: torch.device) -> None:
        self._inputs, self._idx, self._device = inputs, block_idx, device

    def __len__(self) -> int:
        return len(self._inputs.kwargs)

    def __getitem__(self, batch_idx: int) -> dict[str, Any]:  # type: ignore[override]
        return move_to(self._inputs.block_kwargs(self._idx, batch_idx), self._device)


@dataclass
class BlockContext:
    """Everything the calibration of one block reads.

    Attributes:
        index (`int`): block index; ``name`` its qualified name (``"model.layers.3"``).
        block (`nn.Module`): the model's own block, on ``device``; quantized group by group.
        linears (`dict[str, nn.Linear]`): its Linears to quantize, by name relative to the block.
        qcache (`list[torch.Tensor]`): per batch, ``(B, T, hidden)`` inputs on the quantized path.
        fcache (`list[torch.Tensor]` or None): the same on the float path (None: no float pass).
        kwargs (`DeviceKwargs`): per-batch block keyword arguments.
        device (`torch.device`): compute device; ``cache_device`` where caches live.
        probe (`list`): attention configs switched to the probe (empty: no probe).
        held_out (`frozenset[int]`): indices (into the caches) of the batches held out for
            automatic damping (empty: none).
    """

    index: int
    name: str
    block: nn.Module
    linears: dict[str, nn.Linear]
    qcache: list[torch.Tensor]
    fcache: list[torch.Tensor] | None
    kwargs: DeviceKwargs
    device: torch.device
    cache_device: torch.device
    probe: list[Any] = field(default_factory=list)
    held_out: frozenset[int] = frozenset()

    @property
    def batches(self) -> int:
        return len(self.qcache)

    def qualified(self, rel: str) -> str:
        return f"{self.name}.{rel}"
