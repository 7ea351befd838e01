"""`WaterSICHfQuantizer`: the transformers 5.x hooks for ``quant_method="watersic"``.

Two modes, chosen by transformers:

* **quantize on load** (``pre_quantized=False``): the float model is loaded normally (on the CPU
  unless a ``device_map`` says otherwise; blocks offloaded to disk are read one at a time during
  calibration), then :func:`~watersic_hf.integration.calibrate.calibrate_model`
  runs in ``_process_model_after_weight_loading`` and replaces the Linears of every decoder block;
* **load a saved checkpoint** (``pre_quantized=True``): before the weights are read, the Linears
listed
  in ``quantization_config.layers`` are swapped for empty ``WaterSICLinear`` modules on the meta
  device; the v5 loader then fills their tensors by name, with no conversion step.

Only the stable hooks are overridden (see docs/guide.md and the design notes): no on-the-fly
``get_quantize_ops`` and no weight converters.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ._version import __version__
from .config import FORMAT_VERSION, QUANT_METHOD, WaterSICConfig

logger = logging.getLogger(__name__)

__all__ = ["WaterSICHfQuantizer", "register"]


class WaterSICHfQuantizer(HfQuantizer):
    """Quantizer that calibrates with WaterSIC on load and loads saved WaterSIC checkpoints.

    Args:
        quantization_config (`WaterSICConfig`): the config (the checkpoint's when loading one).
        pre_quantized (`bool`, passed by transformers): True when loading a saved checkpoint.
    """

    # False: quantize-on-load is allowed (True would make transformers refuse a float checkpoint).
    requires_calibration = False

    def __init__(self, quantization_config: WaterSICConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    # ------------------------------------------------------------------ environment checks
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Reject setups calibration cannot handle, before anything is loaded.

        Raises:
            ImportError: a required package is missing.
        """
        for package in ("tqdm", "safetensors"):
            if importlib.util.find_spec(package) is None:
                raise ImportError(f"watersic_hf needs `{package}`: pip install {package}")
        # Disk offload is allowed while quantizing: the calibration reads each offloaded block
        # once, quantizes it and keeps only its WaterSICLinears (engine.OnloadingExecutor).

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Keep the requested dtype (float32 when none is given)."""
        if dtype is None:
            return torch.float32
        if dtype == torch.float16 and not self.pre_quantized:
            logger.warning(
                "calibrating in float16 can overflow in some models; bfloat16 or float32 is safer"
            )
        return dtype

    def update_device_map(
        self, device_map: dict[str, Any] | str | None
    ) -> dict[str, Any] | str | None:
        """Quantize mode: load the float model on the CPU by default (one block at a time goes to
        the accelerator during calibration)."""
        if device_map is None and not self.pre_quantized:
            return {"": "cpu"}
        return device_map

    # ------------------------------------------------------------------ model surgery
    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        cfg = self.quantization_config
        if not self.pre_quantized:
            from .integration.plan import check_architecture

            # Refuse unsupported models (encoder-decoder, Conv1D, no decoder blocks) on the empty
            # skeleton, before the float weights are read and calibration starts.
            check_architecture(model)
        self.modules_to_not_convert = sorted(
            self.get_modules_to_not_convert(
                model,
                cfg.modules_to_not_convert,
                getattr(model, "_keep_in_fp32_modules", None),
                add_default_skips=True,
            )
        )
        if self.pre_quantized:
            if not cfg.layers:
                raise ValueError(
                    "this checkpoint's quantization_config (quant_method='watersic') lists no "
                    "quantized layers; the config.json is incomplete or was not written by "
                    "watersic_hf"
                )
            from .storage.checkpoint import (
                build_checkpoint_skeleton,
                layer_storage,
                verify_checkpoint,
            )

            if cfg.format_version >= 2:
                # Every byte of the files is checked before any of it reaches the model.
                verify_checkpoint(cfg, kwargs.get("checkpoint_files"))
                count = build_checkpoint_skeleton(model, cfg.layers, version=cfg.format_version)
            else:
                from .integration.replace import build_skeleton

                packed_layers = {
                    n: m for n, m in cfg.layers.items() if layer_storage(m) != "entropy"
                }
                count = build_skeleton(model, packed_layers, backend=cfg.backend)
                count += build_checkpoint_skeleton(model, cfg.layers, version=1)
            logger.info(
                "WaterSIC: %d Linear modules replaced by loading placeholders", count
            )
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from .nn import WaterSICLinear

        cfg = self.quantization_config
        if self.pre_quantized:
            from .storage.checkpoint import materialize_loaded_model

            # Placeholders -> WaterSICLinear: manifests and layouts checked, streams decoded.
            materialize_loaded_model(model, backend=cfg.backend)
            # The v5 loader wraps loaded float tensors as Parameters with requires_grad=True.
            for module in model.modules():
                if isinstance(module, WaterSICLinear):
                    module.requires_grad_(False)
                    module.finish_loading()
                    if cfg.backend is not None:
                        module.backend = cfg.backend
            return _with_model_card(model)

        from .integration.calibrate import calibrate_model
        from .integration.data import calibration_tokenizer, describe_dataset

        # Loaded once here so that the tokenizer calibration used is saved with the model.
        tokenizer = calibration_tokenizer(cfg.tokenizer, cfg.dataset, cfg.method, model)
        result = calibrate_model(
            model, cfg, modules_to_not_convert=self.modules_to_not_convert, tokenizer=tokenizer
        )
        if cfg.finetune:
            from .integration.finetune import finetune_after_calibration

            # WaterSIC-FT: only the fp16 scales change, so the layouts recorded below still hold.
            cfg.finetune_report = finetune_after_calibration(model, cfg, result).to_dict()
        layers: dict[str, dict[str, Any]] = {}
        reports = {r.name: r for r in result.reports}
        for name, module in result.modules.items():
            r = reports[name]
            layers[name] = {
                "in": module.in_features,
                "out": module.out_features,
                "bias": module.bias is not None,
                "layout": module.layout_metadata(),
                "bits": round(r.bits, 6),
                "target_bits": round(r.target_bits, 6),
                "dead_columns": r.dead_columns,
                "rel_err": float(f"{r.rel_err:.6g}"),
            }
            if r.damp is not None:
                layers[name]["damp"] = float(f"{r.damp:.6g}")
            if r.heldout_rel_err is not None:
                layers[name]["heldout_rel_err"] = float(f"{r.heldout_rel_err:.6g}")
        cfg.layers = layers
        cfg.achieved_bits = round(result.achieved_bits, 6)
        cfg.modules_to_not_convert = list(self.modules_to_not_convert)
        cfg.format_version = FORMAT_VERSION
        cfg.watersic_version = __version__
        cfg.calibration_tokens = result.tokens
        cfg.calibration_data = None if cfg.method == "rtn" else describe_dataset(cfg.dataset)
        # transformers 5.x assigns the config in postprocess_model already; 4.x did not, and doing
        # it
        # here as well makes sure the per-layer metadata reaches config.json.
        model.config.quantization_config = cfg
        return _with_model_card(model, tokenizer)

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, Any] | None, dict]:
        """Called by ``save_pretrained`` before config.json is written: entropy-code the layers
        (``storage="entropy"``) and record their stream metadata and the rate report in the
        config. See :func:`watersic_hf.storage.checkpoint.encode_model_state`."""
        from .storage.checkpoint import encode_model_state

        return encode_model_state(model, self.quantization_config)

    # ------------------------------------------------------------------ capabilities
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """True: gradients flow through ``WaterSICLinear`` (the packed op has an autograd
        formula), so transformers' Trainer accepts the model once trainable adapters are attached
        (LoRA via ``watersic_hf.register_lora``). The codes and scales themselves stay frozen
        (``requires_grad=False``); ``is_qat_trainable`` stays False."""
        return True

    @property
    def is_compileable(self) -> bool:
        """True: ``WaterSICLinear`` traces with ``torch.compile(fullgraph=True)`` (the torch path is
        plain tensor code, the Triton path a ``torch.library`` custom op), so ``generate`` with a
        static cache and a ``compile_config`` compiles the forward instead of skipping it."""
        return True

    def _dequantize(self, model: Any, dtype: torch.dtype | str | None = None) -> Any:
        from .integration.replace import dequantize_model

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        return dequantize_model(model, dtype)


def _with_model_card(model: Any, tokenizer: Any = None) -> Any:
    """Make ``save_pretrained`` / ``push_to_hub`` of this model write the WaterSIC model card (whose
    usage snippet starts with ``import watersic_hf``), and the calibration ``tokenizer`` if any."""
    from .model_card import install_save_hooks

    return install_save_hooks(model, tokenizer=tokenizer)


def register() -> None:
    """Register ``quant_method="watersic"`` with transformers (safe to call more than once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(WaterSICConfig)
    elif AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is not WaterSICConfig:
        logger.warning(
            "quant_method 'watersic' is already registered by %s; keeping it",
            AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD],
        )
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(WaterSICHfQuantizer)
    elif AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is not WaterSICHfQuantizer:
        logger.warning(
            "the 'watersic' quantizer is already registered by %s; keeping it",
            AUTO_QUANTIZER_MAPPING[QUANT_METHOD],
        )


register()
