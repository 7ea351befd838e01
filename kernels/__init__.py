"""Triton kernels for WaterSICLinear, installed as ``watersic_hf.kernels``.

Only relative imports inside this folder: the top-level name ``kernels`` belongs to Hugging
Face's Kernel Hub distribution and must never be imported or installed from here.

When the repository root is on ``sys.path`` (``python -c ...`` or ``python -m pytest`` started in
the root), this folder is found under the name ``kernels`` too, and transformers imports it while
probing for Hugging Face's package. Imported under that name, the module steps aside (see
:func:`_step_aside`) instead of running the relative imports below, which would fail there
("attempted relative import beyond top-level package") and break ``import transformers``.
"""

if __name__ == "kernels":

    def _step_aside() -> None:
        """Hand the name ``kernels`` to Hugging Face's package, or behave as if it were absent.

        * Hugging Face's ``kernels`` installed elsewhere on ``sys.path``: load it and put it in
          ``sys.modules`` in place of this module (the import system returns whatever
          ``sys.modules`` holds once the module body has run), so the shadowing is invisible.
        * Not installed: stay an empty module that transformers' availability probe reads as
          "not installed" (no ``__file__``, no ``__version__``; transformers >= 5.24 imports
          the module when no distribution metadata names it), with no submodules, and with a
          clear ``ImportError`` for any name someone tries to import from it.
        """
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # "" on sys.path means the current directory.
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", others)
        if spec is not None and spec.loader is not None:
            real = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = real
            try:
                spec.loader.exec_module(real)
            except BaseException:
                del sys.modules["kernels"]
                raise
            return
        module = sys.modules["kernels"]
        module.__file__ = None
        module.__path__ = []

    def __getattr__(name: str):  # module-level __getattr__ (PEP 562)
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"cannot import {name!r} from 'kernels': the name resolved to the watersic_hf "
            "repository's kernels/ folder (the repository root is on sys.path) and Hugging Face's "
            "`kernels` package is not installed. Install it (`pip install kernels`) or run Python "
            "from another directory."
        )

    _step_aside()
else:
    from .entropy_decode import triton_decode_segments
    from .packed_matmul import DECODE_MAX_M, triton_packed_matmul

    __all__ = ["DECODE_MAX_M", "triton_decode_segments", "triton_packed_matmul"]
