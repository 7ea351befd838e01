"""Where blocks run: the executor layer of the calibration engine.

The engine asks an executor to bring a block onto the compute device (:meth:`onload`) and,
when the block is quantized, to swap its Linears for ``WaterSICLinear`` and put it away
(:meth:`finish`). The maths never sees where a block lives, so another executor (sequential
onloading of blocks from disk, or one rank of a distributed run that all-reduces statistics) can
replace :class:`SingleDeviceExecutor` without touching the statistics or the quantizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..replace import set_submodule

__all__ = ["Executor", "SingleDeviceExecutor", "home_device"]


def home_device(block: nn.Module) -> torch.device:
    """The device of the block's first parameter (CPU for a block without parameters)."""
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


class Executor(Protocol):
    """Moves blocks to and from the compute device and installs the quantized modules."""

    device: torch.device
    cache_device: torch.device

    def onload(self, block: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """Context in which ``block`` is on :attr:`device`; yields the block to run."""

    def finish(
        self, block: nn.Module, quantized: dict[str, Any], backend: str
    ) -> dict[str, nn.Module]:
        """Replace the quantized Linears of ``block``; returns the new modules by relative name."""


class SingleDeviceExecutor:
    """One compute device; every block is moved there in turn and sent home afterwards.

    Args:
        device (`torch.device`): compute device.
        cache_device (`torch.device`): where activation caches live between passes.
    """

    def __init__(self, device: torch.device, cache_device: torch.device) -> None:
        self.device = device
        self.cache_device = cache_device
        self._homes: dict[int, torch.device] = {}

    @contextlib.contextmanager
    def onload(self, block: nn.Module) -> Iterator[nn.Module]:
        self._homes[id(block)] = home_device(block)
        block.to(self.device)
        try:
            yield block
        finally:
            # On success `finish` already sent the block home; on an error do it here.
            home = self._homes.pop(id(block), None)
            if home is not None:
                block.to(home)

    def finish(
        self, block: nn.Module, quantized: dict[str, Any], backend: str
    ) -> dict[str, nn.Module]:
        from ...nn import WaterSICLinear

        new_modules: dict[str, nn.Module] = {}
        for rel, q in quantized.items():
            old = block.get_submodule(rel)
            bias = old.bias.detach() if old.bias is not None else None
            dtype = bias.dtype if bias is not None else old.weight.dtype
            new = WaterSICLinear.from_quantized(q, bias, dtype=dtype, backend=backend)
            new.requires_grad_(False)
            set_submodule(block, rel, new)
            new_modules[rel] = new
        home = self._homes.pop(id(block), None)
        if home is not None:
            block.to(home)
        return new_modules
