"""Installed means registered: WaterSIC checkpoints load without ``import watersic_hf``.

transformers has no plugin discovery: a checkpoint whose ``quant_method`` is ``"watersic"`` loads
correctly only if ``watersic_hf`` registered the method first, and otherwise transformers only
warns and builds random Linear weights. So pip installs this stdlib-only module next to a one-line
``watersic_hf-autoregister.pth`` in site-packages. Python runs that line at every interpreter start;
it calls :func:`install`, which puts a small finder in ``sys.meta_path`` and imports nothing
else (no torch, no transformers). When a program later imports ``transformers.quantizers`` (the
package that holds transformers' quantizer registry, imported by ``from_pretrained``, ``pipeline``,
``transformers serve`` ...), the finder lets the import finish and then imports ``watersic_hf``,
whose import registers ``quant_method="watersic"``. The finder then removes itself.

``WATERSIC_NO_AUTOREGISTER=1`` switches this off (read at interpreter start and again when the
registry is imported); an explicit ``import watersic_hf`` still registers the method.

This module is a top-level module, not part of the ``watersic_hf`` package, because importing
anything inside ``watersic_hf`` runs its ``__init__``, which imports torch and transformers.
"""

# No `typing` import: it would cost milliseconds at every interpreter start.
from __future__ import annotations

import os
import sys

ENV_VAR = "WATERSIC_NO_AUTOREGISTER"
TARGET = "transformers.quantizers"
PTH_FILE = "watersic_hf-autoregister.pth"
PTH_LINE = "import _watersic_hf_autoregister; _watersic_hf_autoregister.install()"

__all__ = ["ENV_VAR", "PTH_FILE", "PTH_LINE", "TARGET", "disabled", "install", "installed"]


def disabled() -> bool:
    """Whether ``WATERSIC_NO_AUTOREGISTER`` switches the automatic registration off."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


class _RegisterAfterExec:
    """Wraps the loader of ``transformers.quantizers``: run it, then register watersic."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec: object) -> object:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        # Put the real loader back, so nothing of this hook stays visible on the module.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _register()

    def __getattr__(self, name: str) -> object:
        # get_source, get_resource_reader, is_package, ...: the real loader answers.
        return getattr(self._loader, name)


class WaterSICAutoRegisterFinder:
    """``sys.meta_path`` entry that only reacts to the import of :data:`TARGET`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # not a module we can run code after: leave the import alone
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def installed() -> bool:
    """Whether the finder waits in ``sys.meta_path`` (it leaves after registering)."""
    return any(isinstance(f, WaterSICAutoRegisterFinder) for f in sys.meta_path)


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, WaterSICAutoRegisterFinder)]


def _register() -> None:
    _uninstall()
    if disabled():
        return
    try:
        # Registers quant_method "watersic" on import. When the program is importing watersic_hf
        # itself (it imports transformers.quantizers), this returns the half-initialised module
        # and watersic_hf registers when its own import finishes.
        import watersic_hf  # noqa: F401
    except Exception as err:  # never break `import transformers` because of the plugin
        import warnings

        warnings.warn(
            f"watersic_hf is installed but could not register its quantization method with "
            f"transformers ({type(err).__name__}: {err}); WaterSIC checkpoints will not load in "
            f"this process. Run `python -c 'import watersic_hf'` to see the full error, or set "
            f"{ENV_VAR}=1 to turn the automatic registration off.",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """Arrange for watersic_hf to register once transformers' quantizer registry is imported.

    Called by the ``.pth`` line at interpreter start; idempotent. Does nothing when
    ``WATERSIC_NO_AUTOREGISTER=1``. If the registry is already imported, registers right away.
    """
    if disabled() or installed():
        return
    if TARGET in sys.modules:
        _register()
        return
    # First in line: the path finders would otherwise find the module without asking us.
    sys.meta_path.insert(0, WaterSICAutoRegisterFinder())
