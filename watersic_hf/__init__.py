"""watersic_hf: WaterSIC quantization (arXiv 2603.04956) as a Hugging Face transformers plugin.

``import watersic_hf`` registers ``quant_method="watersic"`` with transformers, so that
``from_pretrained(..., quantization_config=WaterSICConfig(bits=3))`` quantizes a model and a
plain ``from_pretrained(path)`` loads a saved WaterSIC checkpoint. An installed watersic-hf also
does this by itself in every process, when transformers' quantizer registry is first imported
(``_watersic_hf_autoregister``, switched off by ``WATERSIC_NO_AUTOREGISTER=1``). Where neither
happens, transformers does not know the method and refuses the checkpoint (size mismatch).
"""

from ._version import __version__
from .config import FORMAT_VERSION, WaterSICConfig
from .nn import WaterSICLinear
from .quantizer import WaterSICHfQuantizer
from .report import report


def register_lora(config):  # noqa: ANN001, ANN201 - peft types, imported lazily
    """Let a `peft.LoraConfig` put LoRA adapters on `WaterSICLinear` layers (QLoRA-style).

    ``get_peft_model(model, watersic_hf.register_lora(LoraConfig(target_modules=[...])))``;
    see `watersic_hf.integration.peft.register_lora`. Imports ``peft`` on the first call only,
    so ``import watersic_hf`` does not need it.
    """
    try:
        from .integration.peft import register_lora as _register
    except ImportError as err:
        raise ImportError(
            f"LoRA on WaterSIC layers needs PEFT ({err}): pip install 'watersic-hf[train]'"
        ) from err
    return _register(config)


_FINETUNE_NAMES = ("FinetuneReport", "FinetuneSettings", "finetune_scales")


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    # WaterSIC-FT is imported on first use: the autoregistration hook imports this package while
    # transformers is still importing its quantizer registry, and finetune.py reaches into
    # transformers' modeling code (a circular import at that moment).
    if name in _FINETUNE_NAMES:
        from .integration import finetune

        return getattr(finetune, name)
    raise AttributeError(f"module 'watersic_hf' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "FinetuneReport",
    "FinetuneSettings",
    "WaterSICConfig",
    "WaterSICHfQuantizer",
    "WaterSICLinear",
    "__version__",
    "register_lora",
    "finetune_scales",
    "report",
]
