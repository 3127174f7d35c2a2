"""The short-name alias behind ``plugins: [axolotl_otr]`` (``_axolotl_otr_alias.py``)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import _axolotl_otr_alias as alias

REPO = Path(__file__).resolve().parents[2]


def test_a_patch_that_no_longer_fits_warns_once_naming_the_axolotl_version(monkeypatch):
    monkeypatch.setattr(alias, "_warned", set())
    monkeypatch.setattr(alias, "_axolotl_version", lambda: "9.9.9")
    renamed = types.ModuleType(alias.PLUGIN_MODULE)
    renamed.PluginManager = type("PluginManager", (), {"register_plugin": lambda self, n: n})
    with pytest.warns(RuntimeWarning, match=r"Axolotl 9\.9\.9.*axolotl_otr\.OTRPlugin"):
        assert alias.apply_patch(alias.PLUGIN_MODULE, renamed) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure stays quiet
        assert alias.apply_patch(alias.PLUGIN_MODULE, renamed) is False


def test_the_wrapping_loader_delegates_everything_but_exec_module(tmp_path, monkeypatch):
    source = tmp_path / "fake_manager.py"
    source.write_text("class PluginManager:\n    def register(self, name):\n        return name\n")
    original = importlib.machinery.SourceFileLoader("fake_manager", str(source))
    loader = alias._PatchingLoader(original, alias.PLUGIN_MODULE)
    assert loader.get_source("fake_manager") == source.read_text()
    assert loader.is_package("fake_manager") is False
    assert loader.get_filename("fake_manager") == str(source)
    spec = importlib.util.spec_from_loader("fake_manager", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    assert module.PluginManager().register("axolotl_otr") == "axolotl_otr.OTRPlugin"
    assert module.PluginManager().register("other.Plugin") == "other.Plugin"


def _alias_state(env: dict[str, str]) -> str:
    code = (
        "import sys, _axolotl_otr_alias as a; "
        "print(any(isinstance(f, a._Finder) for f in sys.meta_path))"
    )
    env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_environment_variable_turns_the_alias_off():
    assert _alias_state({alias.DISABLE_ENV: ""}) == "True"
    assert _alias_state({alias.DISABLE_ENV: "1"}) == "False"
