"""Lets Axolotl accept the short plugin name ``plugins: [axolotl_otr]``.

Axolotl's ``load_plugin`` splits a plugin name on its last dot, so a bare module name
fails with an unpacking error before any plugin code can run. The ``.pth`` file shipped
with this package imports this module at interpreter start-up; it only registers an
import hook that, when ``axolotl.integrations.base`` is first imported, wraps
``PluginManager.register`` so that the exact name ``axolotl_otr`` is registered as
``axolotl_otr.OTRPlugin`` (one canonical name, so both spellings, or the spelling plus
an entry point, never register the plugin twice). Every other name goes to Axolotl
unchanged. Standard library only, and it never raises:
a failure here must not break Python start-up.
"""

from __future__ import annotations

import importlib.abc
import sys

SHORT_NAMES = {"axolotl_otr": "axolotl_otr.OTRPlugin"}
TARGET_MODULE = "axolotl.integrations.base"


def patch_plugin_manager(module) -> None:
    """Wrap ``module.PluginManager.register`` so short names resolve (idempotent)."""
    manager = getattr(module, "PluginManager", None)
    original = getattr(manager, "register", None)
    if original is None or getattr(original, "_otr_short_names", False):
        return

    def register(self, plugin_name, *args, **kwargs):
        if isinstance(plugin_name, str):
            plugin_name = SHORT_NAMES.get(plugin_name, plugin_name)
        return original(self, plugin_name, *args, **kwargs)

    register._otr_short_names = True
    register.__doc__ = original.__doc__
    manager.register = register


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            patch_plugin_manager(module)
        except Exception:  # noqa: BLE001 - never break the import of Axolotl itself
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch now if Axolotl is already imported, else when it is."""
    try:
        module = sys.modules.get(TARGET_MODULE)
        if module is not None:
            patch_plugin_manager(module)
        elif not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001
        pass


install()
