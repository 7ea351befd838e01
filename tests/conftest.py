"""Shared pytest setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before
``watersic_hf.kernels`` is imported, so it is set here at the very top on machines without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one intra-op thread.

    For modules made of many small tensor operations: on shared CI cores extra threads only add
    barrier waits (measured: 85 s with 2 threads vs 13 s with 1 at load average 11).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def calib_texts():
    return list(CALIB_TEXTS)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    make_local_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-block random Llama (untied) with a local word-level tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model("llama", path)
    make_local_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M converted to a plain HF folder (cached across runs under $WATERSIC_CACHE)."""
    from watersic_hf.assets import smollm2_dir as convert

    try:
        return convert()
    except ModuleNotFoundError as err:  # pragma: no cover - CI installs the assets
        pytest.skip(str(err))
