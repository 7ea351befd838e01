"""Where blocks run: the executor layer of the calibration engine.

The engine asks an executor to bring a block onto the compute device (:meth:`onload`) and,
when the block is quantized, to swap its Linears for ``WaterSICLinear`` and put it away
(:meth:`finish`). The maths never sees where a block lives, so another executor (sequential
onloading of blocks from disk, or one rank of a distributed run that all-reduces statistics) can
replace :class:`SingleDeviceExecutor` without touching the statistics or the quantizer.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..replace import set_submodule

__all__ = ["Executor", "OnloadingExecutor", "SingleDeviceExecutor", "has_offloaded_parameters",
           "home_device"]


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
        with self._lent(block, home_device(block)):
            block.to(self.device)
            yield block

    @contextlib.contextmanager
    def _lent(self, block: nn.Module, home: torch.device) -> Iterator[None]:
        """Remember where ``block`` goes back to; on success ``finish`` sends it there, on an
        error this does."""
        self._homes[id(block)] = home
        try:
            yield
        finally:
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


def _offload_hook(module: nn.Module) -> Any:
    """The accelerate hook of ``module`` that reads its weights from a weights map, if any."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) \
                is not None:
            return h
    return None


def has_offloaded_parameters(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is offloaded by accelerate (meta, read on use)."""
    return any(
        _offload_hook(m) is not None
        and any(p.device.type == "meta" for p in m.parameters(recurse=False))
        for m in model.modules()
    )


def offloaded_tensors(block: nn.Module) -> dict[str, tuple[Any, str]]:
    """Where each offloaded tensor of ``block`` is read from.

    Returns:
        ``{name relative to the block: (weights map, key in it)}`` for every parameter or buffer
        on the meta device whose module (or an ancestor inside the block) carries an accelerate
        offload hook; the innermost hook wins, as in transformers' ``load_offloaded_parameter``.
    """
    hooked = {name: h for name, m in block.named_modules() if (h := _offload_hook(m)) is not None}
    out: dict[str, tuple[Any, str]] = {}
    tensors = [*block.named_parameters(), *block.named_buffers()]
    for name, t in tensors:
        if t.device.type != "meta":
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:cut])
            if owner in hooked:
                out[name] = (hooked[owner].weights_map, ".".join(parts[cut:]))
                break
    return out


class OnloadingExecutor(SingleDeviceExecutor):
    """Blocks offloaded by accelerate are read from their weights map one at a time.

    ``from_pretrained(..., device_map="auto", max_memory=..., offload_folder=...)`` leaves the
    blocks that do not fit on the meta device with an accelerate hook that reads their weights
    (from the checkpoint's safetensors files or the offload folder) at every forward and drops
    them afterwards. Calibration runs a block many times, so this executor instead reads the
    block's tensors once (:meth:`onload`), removes its hooks and, once the Linears are replaced
    by ``WaterSICLinear`` (:meth:`finish`), keeps the quantized block in CPU memory; the float
    weights are released. Peak memory is then about one float block plus the blocks the device
    map kept in memory, the embeddings, the activation caches and the quantized blocks so far.
    Blocks that are in memory are handled as by :class:`SingleDeviceExecutor`.
    """

    @contextlib.contextmanager
    def onload(self, block: nn.Module) -> Iterator[nn.Module]:
        sources = offloaded_tensors(block)
        if not sources:
            with super().onload(block) as b:
                yield b
            return
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import set_module_tensor_to_device

        # The hooks would re-read (and drop) the weights at every call; the block now keeps them.
        remove_hook_from_module(block, recurse=True)
        for name, (weights_map, key) in sources.items():
            set_module_tensor_to_device(block, name, self.device, value=weights_map[key])
        del sources
        with self._lent(block, self.cache_device):
            yield block

    def finish(
        self, block: nn.Module, quantized: dict[str, Any], backend: str
    ) -> dict[str, nn.Module]:
        new = super().finish(block, quantized, backend)
        gc.collect()  # the float Linears of the block are garbage now: give their memory back
        return new
