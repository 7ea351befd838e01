"""Data-parallel calibration over a ``torch.distributed`` process group (NCCL or gloo).

How a run with ``R`` ranks splits the work, and why it gives the codes of a one-process run:

* **Windows are sharded by batch.** The calibration batches (``B`` of them, each ``batch_size``
  windows) are cut into ``R`` contiguous ranges in batch order (:func:`shard_bounds`); rank ``r``
  captures, runs and caches only its range. Every batch keeps its shape, so each block call and
  each per-batch product is the same computation as in one process.
* **Σ is reduced in batch order, as a chain.** One process adds the fp32 product of every batch
  to an fp64 sum in batch order; floating-point addition is not associative, so an all-reduce of
  per-rank partial sums would round differently (and change codes and scales, which
  ``tests/golden`` pins). Instead rank 0 accumulates its batches while its passes run; rank
  ``r > 0`` keeps its batches' inputs, receives the running sums (and token counts) from rank
  ``r − 1``, adds its own batches in order and passes the sums on; the last rank broadcasts the
  finished sums to all (:class:`ShardedPolicy`). The fp64 sums are bit-identical to one process.
  The forward passes run in parallel; the per-batch GEMMs of the statistics run one rank after
  the other.
* **The Linears of a group are solved on different ranks** (Linear ``i`` of the group on rank
  ``i mod R``) and their results (codes, scales, report) are broadcast, so that every rank
  installs every ``WaterSICLinear`` (:class:`DistributedGroupQuantizer`). When global rate
  control is on, a Linear's bit target depends on the rate the previous Linear reached, so the
  owners solve one after the other; with ``rate_control=False`` the targets are independent and
  the owners solve at the same time.
* Scalar per-batch sums (the adaptive-ε search's input errors) are gathered and added in batch
  order (:meth:`Communicator.ordered_sum`); the group discovery of each block runs on rank 0 on
  global batch 0 and is broadcast.

Every rank ends with the same quantized model; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .context import BlockContext, LayerStats
from .group_quantizer import GroupQuantizer
from .observers import LayerDone
from .policy import StatisticsPolicy
from .runner import PairedBatch, PairedRunner

logger = logging.getLogger("watersic_hf.integration.calibrate")

__all__ = ["Communicator", "DistributedGroupQuantizer", "ShardedPolicy", "shard_bounds"]


def shard_bounds(n_batches: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` batch ranges of ``world`` ranks, in rank order.

    The first ``n_batches mod world`` ranks get one batch more (``numpy.array_split``'s rule).

    Raises:
        ValueError: fewer batches than ranks.
    """
    if n_batches < world:
        raise ValueError(
            f"{n_batches} calibration batches cannot be shared by {world} processes; raise "
            f"nsamples (or lower batch_size) to at least {world} batches, or run fewer processes"
        )
    base, extra = divmod(n_batches, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class Communicator:
    """The process group of a distributed calibration.

    Attributes:
        rank (`int`): this process's rank; ``world`` (`int`) the number of ranks.
        device (`torch.device`): where collective tensors live (CUDA for NCCL, else the CPU).
    """

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_environment(cls) -> Communicator | None:
        """The default process group when one is initialised with more than one rank, else None."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def first(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ objects and scalars
    def broadcast_object(self, obj: Any, src: int, map_location: torch.device) -> Any:
        """``obj`` of rank ``src`` on every rank, its tensors on ``map_location``.

        Serialised with ``torch.save`` (tensors keep dtype, shape and bits) into a byte tensor, so
        that tensors on an accelerator of ``src`` arrive on this rank's device.
        """
        if self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, src)
        if self.rank == src:
            dist.broadcast(payload.to(self.device), src)
            return obj
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src)
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=map_location,
                          weights_only=False)

    def ordered_sum(self, values: list[float]) -> float:
        """``Σ`` of every rank's per-batch ``values``, added in global batch order.

        Equal to the one-process loop ``s = 0.0; for v in values_of_all_batches: s += v``.
        """
        gathered: list[list[float] | None] = [None] * self.world
        dist.all_gather_object(gathered, values)
        total = 0.0
        for part in gathered:
            for v in part or []:
                total += v
        return total

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    # ------------------------------------------------------------------ moment sums
    def chain_reduce(self, accumulators: list[Any], add_local: Any) -> None:
        """Sum the fp64 ``accumulators`` of all ranks in batch order (see the module docstring).

        Args:
            accumulators (`list[MomentAccumulator]`): this rank's sums; rank 0's already hold its
                batches, the other ranks' are still empty.
            add_local (`Callable[[], None]`): adds this rank's batches (ranks ``> 0``), called
                after the running sums of the ranks before it have arrived.
        """
        tokens = torch.zeros(len(accumulators), dtype=torch.int64, device=self.device)
        if self.rank > 0:
            for acc in accumulators:
                self._recv_into(acc.sum, self.rank - 1)
            dist.recv(tokens, self.rank - 1)
            for acc, t in zip(accumulators, tokens.tolist(), strict=True):
                acc.tokens = int(t)
            add_local()
        if self.rank < self.world - 1:
            for acc in accumulators:
                self._send(acc.sum, self.rank + 1)
            tokens = torch.tensor([a.tokens for a in accumulators], dtype=torch.int64,
                                  device=self.device)
            dist.send(tokens, self.rank + 1)
        last = self.world - 1
        for acc in accumulators:
            buf = acc.sum.to(self.device)
            dist.broadcast(buf, last)
            if buf is not acc.sum:
                acc.sum.copy_(buf)
        if self.rank == last:
            tokens = torch.tensor([a.tokens for a in accumulators], dtype=torch.int64,
                                  device=self.device)
        dist.broadcast(tokens, last)
        for acc, t in zip(accumulators, tokens.tolist(), strict=True):
            acc.tokens = int(t)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.to(self.device).contiguous(), dst)

    def _recv_into(self, t: torch.Tensor, src: int) -> None:
        buf = t if t.device == self.device and t.is_contiguous() else torch.empty_like(
            t, device=self.device)
        dist.recv(buf, src)
        if buf is not t:
            t.copy_(buf)


def _to(batch: PairedBatch, device: torch.device) -> PairedBatch:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return PairedBatch(batch.index, batch.x_hat.to(device), mv(batch.x), mv(batch.p), mv(batch.dr))


class ShardedPolicy:
    """A statistics policy whose sums cover the batches of every rank, in batch order.

    Rank 0 feeds its batches to ``inner`` as they come; the other ranks keep theirs (on the cache
    device) until :meth:`solve`, where :meth:`Communicator.chain_reduce` hands them the running
    sums of the ranks before them.

    Args:
        inner: a :class:`~.policy.FixedMixPolicy` or :class:`~.policy.AdaptiveEpsPolicy`.
        ctx (`BlockContext`): the block (devices).
        comm (`Communicator`): the process group.
    """

    def __init__(self, inner: StatisticsPolicy, ctx: BlockContext, comm: Communicator) -> None:
        self.inner, self.ctx, self.comm = inner, ctx, comm
        self._pending: list[PairedBatch] = []

    def add(self, batch: PairedBatch) -> None:
        if self.comm.first:
            self.inner.add(batch)
        else:
            self._pending.append(_to(batch, self.ctx.cache_device))

    def _add_pending(self) -> None:
        for batch in self._pending:
            self.inner.add(_to(batch, self.ctx.device))
        self._pending.clear()

    def solve(self, quantizer: GroupQuantizer, runner: PairedRunner) -> dict[str, Any]:
        self.comm.chain_reduce(self.inner.accumulators(), self._add_pending)
        return self.inner.solve(quantizer, runner)


class DistributedGroupQuantizer(GroupQuantizer):
    """A :class:`GroupQuantizer` whose Linears are solved on different ranks and broadcast.

    Every rank receives every result: the dequantized weight is written into its copy of the
    block and the :class:`LayerDone` event reaches its observers (rate control, reports), so the
    ranks stay identical.
    """

    def __init__(self, config: Any, rate: Any, observers: list[Any], comm: Communicator) -> None:
        super().__init__(config, rate, observers)
        self.comm = comm

    def quantize_group(self, ctx: BlockContext, names: tuple[str, ...],
                       stats: LayerStats, choice: Any = None) -> dict[str, Any]:
        comm = self.comm
        owner = {rel: i % comm.world for i, rel in enumerate(names)}
        mine = [rel for rel in names if owner[rel] == comm.rank]
        # Every rank made the same damping choice from the same reduced statistics.
        damp = self.damp if choice is None else choice.damp
        held = {} if choice is None else choice.heldout_rel_err
        prepared = (self.prepare(stats, ctx.linears[names[0]].weight, damp=damp) if mine
                    else None)
        # With rate control a target depends on the rate the previous Linear reached.
        independent = not self.rate.enabled
        events: dict[str, LayerDone] = {}
        if independent:
            for rel in mine:
                events[rel] = self.solve_linear(ctx.qualified(rel), ctx.linears[rel], stats,
                                                prepared, damp, held.get(rel))
        out = {}
        for rel in names:
            if owner[rel] == comm.rank and rel not in events:
                events[rel] = self.solve_linear(ctx.qualified(rel), ctx.linears[rel], stats,
                                                prepared, damp, held.get(rel))
            event = comm.broadcast_object(events.get(rel), owner[rel], ctx.device)
            self.apply_linear(ctx.linears[rel], event)
            out[rel] = event.quantized
        return out


def torchrun_environment() -> bool:
    """True inside ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1 and ``RANK``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment() -> Communicator | None:
    """Initialise the default process group from the ``torchrun`` environment (if not done).

    NCCL when CUDA is available (the device is set to ``LOCAL_RANK``), gloo otherwise.
    """
    if not torchrun_environment():
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return Communicator.from_environment()
