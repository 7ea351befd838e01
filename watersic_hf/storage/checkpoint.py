"""Save/load wiring of the entropy-coded checkpoint format (``WaterSICConfig(storage="entropy")``).

* :func:`encode_model_state` — for ``HfQuantizer.get_state_dict_and_metadata``: the state dict
  with each quantized layer's packed code tensors replaced by ``<name>.codes_stream`` and
  ``<name>.codes_model`` (uint8), and the per-layer stream metadata recorded in the config.
* :func:`build_encoded_skeleton` — before the weights are read: empty :class:`WaterSICEncodedLinear`
  modules on the meta device, shaped from the config's metadata.
* :func:`decode_loaded_model` — after the weights are read: streams → codes → ``WaterSICLinear``.

See docs/format.md, section "Checkpoint (safetensors) layout".
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import packing
from .codec import (
    EncodedCodes,
    decode_codes,
    encode_codes,
    encoded_tensor_specs,
)

logger = logging.getLogger(__name__)

__all__ = [
    "STREAM_TENSOR_NAMES",
    "WaterSICEncodedLinear",
    "build_encoded_skeleton",
    "code_tensor_names",
    "decode_loaded_model",
    "encode_model_state",
    "encoded_module",
    "layer_storage",
]

STREAM_TENSOR_NAMES = ("codes_stream", "codes_model")
"""Per-layer tensor names of the entropy storage (suffixes after the module name)."""


def layer_storage(meta: dict[str, Any]) -> str:
    """Storage of one layer entry of ``WaterSICConfig.layers`` (absent = ``"packed"``, as in
    checkpoints written before the entropy storage existed)."""
    return str(meta.get("storage", "packed"))


def code_tensor_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of a ``WaterSICLinear`` that hold its codes (not the scales)."""
    if module.format == "plain":
        return ("weight_codes",)
    return tuple(packing.CODE_TENSOR_NAMES)


def encoded_module(module: nn.Module, name: str) -> EncodedCodes:
    """Entropy-code the codes of one ``WaterSICLinear`` (cached on the module: the codes are
    frozen, so a second save does not re-encode; the cache is keyed on the tensors' versions)."""
    params = [getattr(module, n) for n in code_tensor_names(module)]
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = getattr(module, "_watersic_encoded", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    enc = encode_codes(module.codes().cpu(), name=name)
    module._watersic_encoded = (key, enc)
    return enc


def _config_targets(model: nn.Module, cfg: Any) -> list[Any]:
    # transformers keeps the config on model.config.quantization_config; the quantizer holds its
    # own reference. Both are updated so that config.json gets the metadata whichever is written.
    targets = [cfg]
    other = getattr(getattr(model, "config", None), "quantization_config", None)
    if other is not None and other is not cfg and hasattr(other, "layers"):
        targets.append(other)
    return targets


def encode_model_state(model: nn.Module, cfg: Any) -> tuple[dict[str, torch.Tensor] | None,
                                                             dict[str, str]]:
    """State dict and safetensors header metadata for ``save_pretrained``.

    Args:
        model (`PreTrainedModel`): a model holding ``WaterSICLinear`` modules.
        cfg (`WaterSICConfig`): its quantization config; ``cfg.layers[name]`` gets ``"storage"``
            and (entropy storage) ``"entropy"`` (the codec metadata: lengths, CRC-32s, ...), and
            ``cfg.report`` the summary of :func:`watersic_hf.report`.

    Returns:
        ``(state_dict, metadata)``: ``state_dict`` is ``None`` for packed storage (transformers
        then saves ``model.state_dict()`` as is); for entropy storage the packed code tensors
        of each quantized layer are replaced by ``<name>.codes_stream`` / ``<name>.codes_model``
        (uint8, 1-D). ``metadata`` (safetensors header) is empty, see the comment below.
    """
    from ..nn import WaterSICLinear
    from ..report import report as make_report

    storage = str(getattr(cfg, "storage", "entropy"))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, WaterSICLinear)}
    # No extra safetensors header keys: safetensors keeps the header metadata in a hash map whose
    # order changes from process to process, so more than transformers' own {"format": "pt"}
    # would make two saves of the same model differ byte for byte. config.json carries the
    # storage and format version instead.
    header: dict[str, str] = {}
    targets = _config_targets(model, cfg)
    state: dict[str, torch.Tensor] | None = None
    if storage == "entropy":
        state = dict(model.state_dict())
        for name, module in modules.items():
            enc = encoded_module(module, name)
            for pname in code_tensor_names(module):
                state.pop(f"{name}.{pname}", None)
            tensors = enc.tensors()
            state[f"{name}.codes_stream"] = tensors["stream"]
            state[f"{name}.codes_model"] = tensors["model"]
            for target in targets:
                entry = target.layers.setdefault(name, {})
                entry["storage"] = "entropy"
                entry["entropy"] = dict(enc.metadata)
    else:
        for target in targets:
            for name in modules:
                entry = target.layers.setdefault(name, {})
                entry["storage"] = "packed"
                entry.pop("entropy", None)
    summary = make_report(model, storage=storage)
    summary.pop("layers", None)
    for target in targets:
        target.report = summary
    return state, header


class WaterSICEncodedLinear(nn.Module):
    """Placeholder for a quantized Linear whose codes are stored as an entropy-coded stream.

    Exists only between ``from_pretrained``'s weight loading and the quantizer's after-hook,
    which replaces it with a ``WaterSICLinear`` (see :func:`decode_loaded_model`); it has no
    forward.

    Parameters (all ``nn.Parameter(requires_grad=False)``):

    * ``codes_stream`` (`(stream_nbytes,)`, uint8) and ``codes_model`` (`(model_nbytes,)`, uint8).
    * ``weight_col_scale`` (`(in,)`, float16), ``weight_row_scale`` (`(out,)`, float16).
    * ``bias`` (`(out,)`, ``dtype``) when ``bias=True``.
    """

    def __init__(self, meta: dict[str, Any], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(meta["in"])
        self.out_features = int(meta["out"])
        self.meta = meta
        specs = encoded_tensor_specs(meta["entropy"])
        shape_codes = tuple(meta["entropy"].get("shape", ()))
        if shape_codes and shape_codes != (self.out_features, self.in_features):
            raise ValueError(
                f"entropy metadata shape {list(shape_codes)} does not match the layer "
                f"(out={self.out_features}, in={self.in_features}); config.json is inconsistent"
            )
        for pname, key in (("codes_stream", "stream"), ("codes_model", "model")):
            shape, dt = specs[key]
            self.register_parameter(pname, _frozen(torch.zeros(shape, dtype=dt, device=device)))
        self.weight_col_scale = _frozen(
            torch.zeros(self.in_features, dtype=torch.float16, device=device))
        self.weight_row_scale = _frozen(
            torch.zeros(self.out_features, dtype=torch.float16, device=device))
        if meta.get("bias"):
            self.bias = _frozen(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "WaterSICEncodedLinear is a loading placeholder; the WaterSIC quantizer decodes it "
            "after the weights are loaded. Load the checkpoint with from_pretrained after "
            "`import watersic_hf`."
        )


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def build_encoded_skeleton(model: nn.Module, layers: dict[str, dict[str, Any]]) -> int:
    """Swap the Linears of the entropy-stored layers for empty encoded modules on meta.

    Args:
        model (`PreTrainedModel`): the model skeleton (weights not loaded yet).
        layers (`dict`): ``WaterSICConfig.layers``; only entries with ``storage="entropy"`` are
            handled here (the others by ``integration.replace.build_skeleton``).

    Returns:
        the number of replaced modules.

    Raises:
        ValueError: a listed module is missing, not a Linear, has another shape, or its entry
            lacks the ``"entropy"`` metadata.
    """
    from ..integration.replace import set_submodule, skeleton_dtype

    count = 0
    for name, meta in layers.items():
        if layer_storage(meta) != "entropy":
            continue
        if not isinstance(meta.get("entropy"), dict):
            raise ValueError(
                f"{name}: quantization_config.layers[{name!r}] says storage='entropy' but has no "
                "'entropy' metadata; the config.json is incomplete"
            )
        dtype = skeleton_dtype(model, name, meta, WaterSICEncodedLinear)
        if dtype is None:
            continue
        set_submodule(model, name, WaterSICEncodedLinear(meta, dtype=dtype, device="meta"))
        count += 1
    return count


def decode_loaded_model(model: nn.Module, *, backend: str | None = None) -> int:
    """Replace every loaded :class:`WaterSICEncodedLinear` by the decoded ``WaterSICLinear``.

    The streams are decoded on the CPU; the new module moves to the device of the loaded scales.

    Returns:
        the number of decoded modules.

    Raises:
        ValueError: a stream is corrupt, truncated or fails its CRC-32 (the message names the
            module and tensor), or a tensor was not found in the checkpoint.
    """
    from ..integration.replace import set_submodule
    from ..nn import WaterSICLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, WaterSICEncodedLinear)]
    for name, module in targets:
        if module.codes_stream.is_meta or module.weight_col_scale.is_meta:
            raise ValueError(
                f"{name}.codes_stream / scales were not found in the checkpoint's safetensors "
                "files; the files are incomplete or do not match config.json"
            )
        enc = EncodedCodes.from_tensors(
            {"stream": module.codes_stream.detach().cpu(),
             "model": module.codes_model.detach().cpu()},
            module.meta["entropy"],
        )
        codes = decode_codes(enc, name=f"{name}.codes_stream")
        device = module.weight_col_scale.device
        layout = module.meta.get("layout") or {"format": "packed"}
        qw = _Quantized(
            codes.to(device),
            module.weight_col_scale.detach().float(),
            module.weight_row_scale.detach().float(),
        )
        bias = module.bias.detach() if module.bias is not None else None
        kwargs: dict[str, Any] = {}
        if layout.get("format") == "packed" and "group_size" in layout:
            kwargs["group_size"] = int(layout["group_size"])
        new = WaterSICLinear.from_quantized(
            qw, bias, dtype=bias.dtype if bias is not None else torch.float32,
            format=layout.get("format", "packed"), backend=backend or "auto", **kwargs,
        )
        new.requires_grad_(False)
        set_submodule(model, name, new)
    if targets:
        logger.info("WaterSIC: decoded %d entropy-coded layers", len(targets))
    return len(targets)


class _Quantized:
    """Minimal ``QuantizedWeight``-like record for ``WaterSICLinear.from_quantized``."""

    def __init__(self, codes: torch.Tensor, col_scale: torch.Tensor,
                 row_scale: torch.Tensor) -> None:
        self.codes, self.col_scale, self.row_scale = codes, col_scale, row_scale
