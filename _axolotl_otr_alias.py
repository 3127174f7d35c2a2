"""The short-name alias: Axolotl accepts ``plugins: [axolotl_otr]``, and refuses ``otr: true``
without it.

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
raises a clear error instead, and refuses misspelt otr keys (``otr_temprature``, ``OTR``)
in every case, the plugin loaded or not (``axolotl_otr.objective.check_known_keys``).

Robustness: the wrapping loader only adds a step after the original loader's
``exec_module`` and delegates everything else to it. When a patch cannot be applied (a
future Axolotl renames what it wraps), one warning says so, naming the Axolotl version,
and Axolotl runs unpatched. ``AXOLOTL_OTR_DISABLE_HOOK=1`` turns the alias off entirely
(then write the full name ``axolotl_otr.OTRPlugin``). Standard library only at start-up
(the key check imports the package's pure ``objective`` module when a config is
validated); installing the alias never raises: a failure here must not break Python
start-up.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import warnings

SHORT_NAMES = {"axolotl_otr": "axolotl_otr.OTRPlugin"}
DISABLE_ENV = "AXOLOTL_OTR_DISABLE_HOOK"
PLUGIN_MODULE = "axolotl.integrations.base"
CONFIG_MODULE = "axolotl.utils.config"


def patch_plugin_manager(module) -> None:
    """Wrap ``module.PluginManager.register`` so short names resolve (idempotent)."""
    manager = getattr(module, "PluginManager", None)
    original = getattr(manager, "register", None)
    if original is None:
        raise AttributeError(f"{module.__name__}.PluginManager.register not found")
    if getattr(original, "_otr_short_names", False):
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
    """Wrap ``module.validate_config`` to refuse ``otr: true`` without the plugin, and
    misspelt otr keys."""
    original = getattr(module, "validate_config", None)
    if original is None:
        raise AttributeError(f"{module.__name__}.validate_config not found")
    if getattr(original, "_otr_guard", False):
        return

    def validate_config(cfg, *args, **kwargs):
        keys = getattr(cfg, "keys", None)
        if callable(keys):
            from axolotl_otr.objective import check_known_keys

            check_known_keys(list(keys()))
        if _get(cfg, "otr") and not otr_plugin_configured(cfg):
            raise ValueError(
                "otr: true is set but the OTR plugin is not loaded, so Axolotl would drop "
                "the otr keys and train with plain cross-entropy: add "
                "`plugins: [axolotl_otr]` to the config."
            )
        return original(cfg, *args, **kwargs)

    validate_config._otr_guard = True
    validate_config.__doc__ = original.__doc__
    module.validate_config = validate_config


def _get(cfg, key):
    getter = getattr(cfg, "get", None)
    return getter(key) if callable(getter) else None


PATCHES = {PLUGIN_MODULE: patch_plugin_manager, CONFIG_MODULE: patch_validate_config}


_warned: set[str] = set()


def apply_patch(name: str, module) -> bool:
    """Apply the patch for ``name`` to ``module``; on failure warn once, never raise."""
    try:
        PATCHES[name](module)
        return True
    except Exception as error:  # noqa: BLE001 - never break the import of Axolotl itself
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"axolotl-otr could not patch {name} of Axolotl {_axolotl_version()} "
                f"({type(error).__name__}: {error}). "
                + _CONSEQUENCE.get(name, "")
                + f" Set {DISABLE_ENV}=1 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return False


_CONSEQUENCE = {
    PLUGIN_MODULE: "The short name `plugins: [axolotl_otr]` will not load; write "
    "`axolotl_otr.OTRPlugin`.",
    CONFIG_MODULE: "`otr: true` without the plugin will not be refused.",
}


def _axolotl_version() -> str:
    try:
        from importlib.metadata import version

        return version("axolotl")
    except Exception:  # noqa: BLE001
        return "(unknown version)"


class _PatchingLoader(importlib.abc.Loader):
    """The original loader, plus one patch after ``exec_module``; all else delegated."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attribute):
        return getattr(self._loader, attribute)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        apply_patch(self._name, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Patch the modules already imported now, the others when they are imported."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    try:
        for name in PATCHES:
            if name in sys.modules:
                apply_patch(name, sys.modules[name])
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001
        pass


install()
