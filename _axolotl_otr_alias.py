"""Lets Axolotl accept ``plugins: [axolotl_otr]``, and refuse ``otr: true`` without it.

Axolotl's ``load_plugin`` splits a plugin name on its last dot, so a bare module name
fails with an unpacking error before any plugin code can run. The ``.pth`` file shipped
with this package imports this module at interpreter start-up; it only registers an
import hook that, when ``axolotl.integrations.base`` is first imported, wraps
``PluginManager.register`` so that the exact name ``axolotl_otr`` is registered as
``axolotl_otr.OTRPlugin`` (one canonical name, so both spellings, or the spelling plus
an entry point, never register the plugin twice). Every other name goes to Axolotl
unchanged.

It also wraps ``axolotl.utils.config.validate_config``: Axolotl drops config keys that no
loaded plugin declares, so ``otr: true`` without the plugin (on Axolotl 0.19, which does
not load entry-point plugins) would silently train with plain cross-entropy. The wrapper
raises a clear error instead. Standard library only; installing the hooks never raises:
a failure here must not break Python start-up.
"""

from __future__ import annotations

import importlib.abc
import sys

SHORT_NAMES = {"axolotl_otr": "axolotl_otr.OTRPlugin"}
PLUGIN_MODULE = "axolotl.integrations.base"
CONFIG_MODULE = "axolotl.utils.config"


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


def otr_plugin_configured(cfg) -> bool:
    """Whether this config loads the OTR plugin: listed in ``plugins:``, or registered
    for every run as an installed entry point (Axolotl 0.20+)."""
    names = [str(name) for name in (_get(cfg, "plugins") or [])]
    builtin = getattr(sys.modules.get(PLUGIN_MODULE), "get_builtin_plugins", None)
    if callable(builtin):
        names += [str(name) for name in builtin()]
    return any(name.split(":")[0].split(".")[0] == "axolotl_otr" for name in names)


def patch_validate_config(module) -> None:
    """Wrap ``module.validate_config`` to refuse ``otr: true`` without the plugin."""
    original = getattr(module, "validate_config", None)
    if original is None or getattr(original, "_otr_guard", False):
        return

    def validate_config(cfg, *args, **kwargs):
        if _get(cfg, "otr") and not otr_plugin_configured(cfg):
            raise ValueError(
                "otr: true is set but the OTR plugin is not loaded, so Axolotl would drop "
                "the otr keys and train with plain cross-entropy. Add it to the config:\n"
                "plugins:\n  - axolotl_otr.OTRPlugin"
            )
        return original(cfg, *args, **kwargs)

    validate_config._otr_guard = True
    validate_config.__doc__ = original.__doc__
    module.validate_config = validate_config


def _get(cfg, key):
    getter = getattr(cfg, "get", None)
    return getter(key) if callable(getter) else None


PATCHES = {PLUGIN_MODULE: patch_plugin_manager, CONFIG_MODULE: patch_validate_config}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            self._patch(module)
        except Exception:  # noqa: BLE001 - never break the import of Axolotl itself
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Patch the modules already imported now, the others when they are imported."""
    try:
        for name, patch in PATCHES.items():
            if name in sys.modules:
                patch(sys.modules[name])
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001
        pass


install()
