"""LoRA adapters on `WaterSICLinear` through PEFT (QLoRA-style fine-tuning).

The quantized layer stays frozen (integer codes, fp16 scales); a LoRA pair ``B·A`` in the
compute dtype is added beside it::

    y = WaterSICLinear(x) + scaling · B(A(dropout(x)))

Gradients reach the adapters, and the activations of earlier layers, through the autograd
formula of ``torch.ops.watersic.packed_linear`` (see `watersic_hf.ops`).

PEFT dispatches custom layer types per `LoraConfig` (its documented "dynamic dispatch of custom
modules", ``LoraConfig._register_custom_module``); it has no global registry, so every config
that targets WaterSIC layers goes through `register_lora` once, also when an adapter is loaded
again (PEFT does not save the mapping)::

    import watersic_hf
    from peft import LoraConfig, PeftModel, get_peft_model

    config = watersic_hf.register_lora(LoraConfig(target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(quantized_model, config)
    ...
    model.save_pretrained("adapter")
    config = watersic_hf.register_lora(LoraConfig.from_pretrained("adapter"))
    model = PeftModel.from_pretrained(fresh_quantized_model, "adapter", config=config)

This module imports ``peft``; ``import watersic_hf`` does not (``watersic_hf.register_lora``
imports it on its first call).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from ..nn import WaterSICLinear

__all__ = ["WaterSICLoraLinear", "register_lora"]


class WaterSICLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer around a frozen `WaterSICLinear` (the custom LoRA type PEFT builds for
    every targeted WaterSIC layer once the config went through `register_lora`).

    Args:
        base_layer (`WaterSICLinear`): the quantized layer (kept as ``base_layer``, frozen).
        adapter_name (`str`): name of the first adapter.
        config (`LoraConfig`): its settings (rank, alpha, dropout, init, bias).
        r (`int`), lora_alpha (`int`): passed by PEFT from the config (pattern-resolved).

    Plain LoRA only: variants that read or rewrite the base weight (DoRA, PiSSA-style inits and
    the like) and merging need a float weight; `merge` explains the alternatives.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower() not in ("gaussian", "eva"):
            # these inits decompose or otherwise read the dense base weight
            raise ValueError(
                f"init_lora_weights={init!r} reads the base weight, which WaterSICLinear holds as "
                "integer codes; use init_lora_weights=True or 'gaussian' on WaterSIC layers."
            )
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        """Plain LoRA only (the base class maps the empty variant set to ``None``)."""
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as err:
            raise ValueError(
                f"{err}. LoRA on WaterSICLinear supports plain LoRA only: variants such as DoRA "
                "(use_dora=True) need the dense base weight; turn them off, or fine-tune "
                "model.dequantize() instead."
            ) from None

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight update ``scaling · B @ A``, shape `(out_features, in_features)`."""
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        return (weight_b.float() @ weight_a.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible: the base weight is integer codes, and adding a float update to it would
        need a new quantization.

        Raises:
            NotImplementedError: always, with the alternatives.
        """
        raise NotImplementedError(
            "a LoRA adapter cannot be merged into a WaterSICLinear (integer codes + scales) "
            "without quantizing again. Keep the adapter unmerged (PeftModel runs it beside the "
            "quantized layer), or merge into the dequantized model: model.dequantize() on the "
            "base before get_peft_model, or quantize the merged float model again."
        )

    def unmerge(self) -> None:
        """Nothing to undo: `merge` never changes a WaterSIC layer."""

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x) + Σ_active scaling · B(A(dropout(x)))``.

        Args:
            x (`torch.Tensor` of shape `(..., in_features)`): activations.
            adapter_names (`list[str]`, *optional*, keyword): one adapter name per batch row
                (PEFT's mixed-batch inference; ``"__base__"`` for none).

        Returns:
            `torch.Tensor` of shape `(..., out_features)` and the base layer's output dtype
            (``x.dtype``).
        """
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for active in self.active_adapters:
            if active not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[active], self.lora_B[active]
            # adapters in their own dtype (e.g. fp32 adapters on a bf16 model); autocast, when
            # on, picks the matmul dtype itself
            autocast = torch.is_autocast_enabled(x.device.type)
            xa = x if autocast else self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[active](xa))) * self.scaling[active]
            result = result + delta.to(out_dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config`` put LoRA adapters on `WaterSICLinear` layers (in place).

    Args:
        config (`peft.LoraConfig`): a LoRA config, new or read back with
            ``LoraConfig.from_pretrained(adapter_dir)``.

    Returns:
        `peft.LoraConfig`: the same object, for one-line use with ``get_peft_model`` or
        ``PeftModel.from_pretrained(..., config=...)``.

    Raises:
        TypeError: ``config`` is not a `peft.LoraConfig`.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"register_lora takes a peft.LoraConfig; got {type(config).__name__}. Build one with "
            "LoraConfig(target_modules=[...]) (LoRA is the PEFT method WaterSIC layers support)."
        )
    # PEFT's documented (experimental) hook for layer types it does not know
    config._register_custom_module({WaterSICLinear: WaterSICLoraLinear})
    return config
