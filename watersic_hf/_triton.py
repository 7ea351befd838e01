"""Optional Triton import guard.

The package must import on machines without Triton or a GPU (CPU CI runs ``import watersic_hf``
with the torch backend). ``HAS_TRITON`` says whether Triton imported; when it did not, ``triton``
and ``tl`` are placeholders whose ``jit`` / ``autotune`` / ``heuristics`` decorators return the
function unchanged, so kernel modules still import and only fail when a kernel is launched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["HAS_TRITON", "interpreter_enabled", "require_triton", "tl", "triton"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

    class _Placeholder:
        """Stands in for ``triton`` / ``triton.language`` when Triton is missing."""

        constexpr = int

        def __getattr__(self, name: str) -> Any:
            raise ImportError(
                f"triton.{name} is unavailable: Triton is not installed. "
                "Install it with `pip install watersic-hf[triton]` or use backend='torch'."
            )

        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Callable:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_: Any, **__: Any) -> Callable:
            return lambda f: f

        @staticmethod
        def heuristics(*_: Any, **__: Any) -> Callable:
            return lambda f: f

        @staticmethod
        def Config(*_: Any, **__: Any) -> None:  # noqa: N802 - mirrors triton.Config
            return None

    triton = _Placeholder()  # type: ignore[assignment]
    tl = _Placeholder()  # type: ignore[assignment]


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def require_triton() -> None:
    """Raise `ImportError` with the install command when Triton is missing."""
    if not HAS_TRITON:
        raise ImportError(
            "The triton backend needs Triton: `pip install watersic-hf[triton]` "
            "(or select backend='torch' / WATERSIC_BACKEND=torch)."
        )
