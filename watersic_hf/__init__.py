"""watersic_hf: WaterSIC quantization (arXiv 2603.04956) as a Hugging Face transformers plugin.

``import watersic_hf`` registers ``quant_method="watersic"`` with transformers, so that
``from_pretrained(..., quantization_config=WaterSICConfig(bits=3))`` quantizes a model and a
plain ``from_pretrained(path)`` loads a saved WaterSIC checkpoint.
"""

from ._version import __version__

__all__ = ["__version__"]
