"""The repo's ``kernels/`` folder is ``watersic_hf.kernels``, never the top-level ``kernels``.

``kernels`` is the import name of Hugging Face's Kernel Hub distribution, which transformers
probes and imports; installing or importing our folder under that name would break it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _imports_top_level_kernels(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "kernels" for alias in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return node.module.split(".")[0] == "kernels"
    return False


def test_subpackage_resolves_inside_watersic_hf():
    import watersic_hf.kernels as k

    assert k.__name__ == "watersic_hf.kernels"
    # a checkout that was never `pip install -e .`-ed has no mapping and fails here
    assert k.__file__ is not None
    assert pathlib.Path(k.__file__).resolve().parent == (REPO / "kernels").resolve()
    assert callable(k.triton_packed_matmul)


def test_no_source_imports_top_level_kernels():
    folders = ("watersic_hf", "kernels", "tests", "benchmarks")
    files = [p for d in folders for p in (REPO / d).rglob("*.py")]
    offenders = sorted(
        str(f.relative_to(REPO))
        for f in files
        if any(_imports_top_level_kernels(n) for n in ast.walk(ast.parse(f.read_text(), str(f))))
    )
    assert not offenders, f"import watersic_hf.kernels instead of top-level `kernels`: {offenders}"


def test_distribution_top_level_excludes_kernels():
    dist = importlib.metadata.distribution("watersic-hf")
    # top_level.txt only: under `python -m pytest` the in-repo egg-info lists kernels/ files
    assert "kernels" not in (dist.read_text("top_level.txt") or "").split()


def test_hf_kernels_is_not_shadowed():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face `kernels` is not installed")
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin is not None
    assert pathlib.Path(spec.origin).resolve().parent != (REPO / "kernels").resolve(), (
        "the repo root is on sys.path, so its kernels/ folder hides Hugging Face's `kernels`: "
        "run `pytest` (not `python -m pytest`) or run from outside the repo root"
    )
