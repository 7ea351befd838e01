"""Python started in the repository root: the top-level ``kernels/`` folder must stay harmless.

With the root on ``sys.path`` our ``kernels/`` folder is found under the name ``kernels``, which
transformers probes (and, since 5.24, imports) while looking for Hugging Face's Kernel Hub package.
See the docstring of ``kernels/__init__.py`` for what the folder does under that name.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRITON_INTERPRET": "1"}


def _run(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    full_env.update(_OFFLINE, **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_transformers_and_watersic_hf_from_repo_root():
    result = _run(["-c", (
        "import transformers, watersic_hf\n"
        "from transformers import AutoModelForCausalLM, pipeline\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import kernels\n"
        "print('kernels available:', is_kernels_available())\n"
        "print('kernels file:', kernels.__file__)\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError as err:\n"
        "    print('import error:', err)\n"
        "import watersic_hf.kernels as k\n"
        "print('subpackage:', k.__name__, callable(k.triton_packed_matmul))\n"
    )])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "kernels available: False" in out and "kernels file: None" in out
    assert "repository's kernels/ folder" in out and "pip install kernels" in out
    assert "subpackage: watersic_hf.kernels True" in out


def test_hugging_face_kernels_takes_over_the_name(tmp_path):
    # A stand-in for Hugging Face's `kernels`, later on sys.path than the repository root.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("LayerRepository = 'hub kernels'\n")
    result = _run(["-c", "import kernels; print(kernels.LayerRepository, kernels.__file__)"],
                  PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0:2] == ["hub", "kernels"]
    assert str(tmp_path) in result.stdout


def test_python_m_pytest_from_repo_root_runs_the_quick_checks():
    # `python -m pytest` puts the root on sys.path; `-k smoke` selects tests/test_smoke.py.
    result = _run(["-m", "pytest", "-q", "-k", "smoke", "-p", "no:cacheprovider"], timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert " passed" in result.stdout  # exit code 0 also rules out "no tests ran" (5)
