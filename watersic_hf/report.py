"""`report(model)`: rates of a WaterSIC-quantized model (entropy, on disk, in memory)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["report"]

_KEYS = ("entropy_bits", "entropy_bits_per_column", "bits_on_disk", "bits_in_memory", "rate_bits")


def _quant_config(model: nn.Module) -> Any:
    return getattr(getattr(model, "config", None), "quantization_config", None)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def report(model: nn.Module, *, storage: str | None = None) -> dict[str, Any]:
    """Bits per weight of every quantized layer and their weight-count-weighted means.

    Args:
        model (`PreTrainedModel` or `nn.Module`): holds ``WaterSICLinear`` modules.
        storage (`str`, *optional*): ``"entropy"`` or ``"packed"``; defaults to the config's
            ``storage`` (``"entropy"`` when the model has no WaterSIC config). For entropy
            storage the stream sizes come from the layer's saved metadata when it has some, else
            the codes are encoded (and the result cached on the module).

    Returns:
        `dict` with, as floats in bits per weight (means weighted by ``in·out``):

        * ``entropy_bits``: pooled plug-in entropy of the codes over the live (non-dead) columns,
          as the algorithm counts it, scaled to all weights of the layer;
        * ``entropy_bits_per_column``: mean per-column plug-in entropy of the codes;
        * ``bits_on_disk``: entropy storage: (stream + model bytes + the stored packing layout,
          i.e. permutation and group table, + 2 bytes per row, column and group scale) × 8 ÷
          weights; packed storage: bytes of the packed code tensors and
          the scales × 8 ÷ weights. The bias is excluded in both cases;
        * ``bits_in_memory``: ``WaterSICLinear.bits_in_memory`` (packed tensors + scales);
        * ``rate_bits``: the calibration's accounted rate ``layers[name]["bits"]`` when known,
          else ``entropy_bits + 16/in + 16/out``;
        * ``n_weights`` (`int`): the number of quantized weights;
        * ``layers``: ``{name: {same keys}}`` per quantized layer.
    """
    from .nn import WaterSICLinear
    from .storage.encoding import (
        code_statistics,
        code_tensor_names,
        encoded_module,
        stored_layout_nbytes,
    )

    cfg = _quant_config(model)
    cfg_layers = _get(cfg, "layers", {}) or {}
    default_storage = storage or _get(cfg, "storage", "entropy") or "entropy"
    layers: dict[str, dict[str, float]] = {}
    total = 0
    sums = dict.fromkeys(_KEYS, 0.0)
    for name, module in model.named_modules():
        if not isinstance(module, WaterSICLinear):
            continue
        meta = cfg_layers.get(name, {})
        n_in, n_out = module.in_features, module.out_features
        weights = n_in * n_out
        pooled, per_col, n_live = code_statistics(module, int(meta.get("dead_columns", 0) or 0))
        entropy = pooled * n_live / n_in
        # row and column scales, plus the group scales of a grouped (standard GPTQ) layer
        group = getattr(module, "weight_group_scale", None)
        scale_bytes = 2 * (n_in + n_out) + (0 if group is None else 2 * group.numel())
        if default_storage == "entropy":
            ent = meta.get("entropy") if meta.get("storage") == "entropy" else None
            if isinstance(ent, dict) and "stream_nbytes" in ent:
                stream_bytes = int(ent["stream_nbytes"]) + int(ent["model_nbytes"])
            else:
                enc = encoded_module(module, name)
                stream_bytes = int(enc.stream.numel() + enc.model.numel())
            # format 2 also stores the packing layout (permutation and group table)
            disk = 8.0 * (stream_bytes + stored_layout_nbytes(module) + scale_bytes) / weights
        else:
            packed = sum(getattr(module, n).numel() * getattr(module, n).element_size()
                         for n in code_tensor_names(module))
            disk = 8.0 * (packed + scale_bytes) / weights
        rate = meta.get("bits")
        if rate is None:
            rate = entropy + 16.0 / n_in + 16.0 / n_out
        row = {
            "entropy_bits": float(entropy),
            "entropy_bits_per_column": float(per_col),
            "bits_on_disk": float(disk),
            "bits_in_memory": float(module.bits_in_memory),
            "rate_bits": float(rate),
        }
        layers[name] = row
        total += weights
        for key in _KEYS:
            sums[key] += row[key] * weights
    if total == 0:
        raise ValueError(
            "report(model): the model has no WaterSICLinear layers; quantize it with "
            "WaterSICConfig or load a WaterSIC checkpoint first"
        )
    out: dict[str, Any] = {key: round(sums[key] / total, 6) for key in _KEYS}
    out["n_weights"] = total
    out["layers"] = layers
    return out
