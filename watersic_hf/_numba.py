"""Optional numba guard for the CPU kernels (``watersic_hf.cpu_kernels``).

``import numba`` takes about half a second, so ``import watersic_hf`` does not pay it:
``HAS_NUMBA`` only checks that the package is installed, and ``watersic_hf.cpu_kernels`` is
imported on the first CPU matmul.
"""

from __future__ import annotations

import importlib.util

__all__ = ["HAS_NUMBA", "require_numba"]

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def require_numba() -> None:
    """Raise an ImportError that names the fix when numba is missing."""
    if not HAS_NUMBA:
        raise ImportError(
            "backend='cpu' needs numba: `pip install numba` (a dependency of watersic-hf), "
            "or use backend='torch'."
        )
