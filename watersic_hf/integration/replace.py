"""Module replacement: which Linears to convert, the empty skeleton for loading, dequantization."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "build_skeleton",
    "dequantize_model",
    "quantizable_linears",
    "set_submodule",
    "should_convert_module",
]


def should_convert_module(name: str, patterns: list[str] | None) -> bool:
    """False when ``name`` matches one of ``patterns``.

    A pattern matches as a prefix ending on a module boundary (``"model.layers.1"`` matches
    ``"model.layers.1.mlp"`` but not ``"model.layers.11.mlp"``), as a regular expression with the
    same boundary rule, or as a plain suffix (``"lm_head"``, ``"self_attn.q_proj"``). transformers
    has the same rule in a private helper; this copy keeps us off private API.
    """
    if not patterns:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        if name.endswith(pattern):
            return False
        try:
            if re.match(rf"(?:{pattern}){boundary}", name):
                return False
        except re.error:
            if name == pattern or name.startswith(pattern + "."):
                return False
    return True


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantizable_linears(
    block: nn.Module, block_name: str, skip: list[str] | None
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one block to quantize, by name relative to the block."""
    found: dict[str, nn.Linear] = {}
    for rel, module in block.named_modules():
        if type(module) is nn.Linear and should_convert_module(f"{block_name}.{rel}", skip):
            found[rel] = module
    return found


def skeleton_dtype(
    model: nn.Module, name: str, meta: dict[str, Any], replaced: type[nn.Module]
) -> torch.dtype | None:
    """Check the Linear ``name`` that a checkpoint's layer entry ``meta`` will replace.

    Shared by the skeleton builders of both storage modes.

    Returns:
        the float dtype for the replacement module's bias, or ``None`` when ``name`` already is a
        ``replaced`` module (nothing to do).

    Raises:
        ValueError: the module is missing, not an ``nn.Linear``, or its shape differs from
            ``meta["in"]`` / ``meta["out"]``.
    """
    try:
        old = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(
            f"the checkpoint's quantization_config lists {name!r}, which this model does not "
            "have; the config.json and the model class do not match"
        ) from err
    if isinstance(old, replaced):
        return None
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"{name} is a {type(old).__name__}, expected nn.Linear to swap for {replaced.__name__}"
        )
    if (old.in_features, old.out_features) != (meta["in"], meta["out"]):
        raise ValueError(
            f"{name}: the checkpoint has shape (out={meta['out']}, in={meta['in']}) but the "
            f"model has (out={old.out_features}, in={old.in_features})"
        )
    return old.weight.dtype if old.weight.is_floating_point() else torch.float32


def build_skeleton(
    model: nn.Module, layers: dict[str, dict[str, Any]], *, backend: str | None
) -> int:
    """Swap the Linears named in ``layers`` for empty ``WaterSICLinear`` modules on the meta device.

    Args:
        model (`PreTrainedModel`): the skeleton built by ``from_pretrained`` (weights not loaded
            yet).
        layers (`dict`): ``WaterSICConfig.layers`` of a saved checkpoint.
        backend (`str`, *optional*): kernel backend for the new modules.

    Returns:
        the number of replaced modules.

    Raises:
        ValueError: a listed module is missing or its shape differs from the metadata.
    """
    from ..nn import WaterSICLinear

    count = 0
    for name, meta in layers.items():
        dtype = skeleton_dtype(model, name, meta, WaterSICLinear)
        if dtype is None:
            continue
        new = WaterSICLinear(
            meta["in"],
            meta["out"],
            bool(meta["bias"]),
            meta["layout"],
            dtype=dtype,
            device="meta",
            backend=backend or "auto",
        )
        new.requires_grad_(False)
        set_submodule(model, name, new)
        count += 1
    return count


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``WaterSICLinear`` by the equivalent ``nn.Linear`` (in place)."""
    from ..nn import WaterSICLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, WaterSICLinear)]
    for name, module in targets:
        out_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        set_submodule(model, name, module.dequantize(dtype=out_dtype))
    logger.info("dequantized %d WaterSIC layers to nn.Linear", len(targets))
    return model
