"""The start-up hook behind ``plugins: [axolotl_otr]`` (``_axolotl_otr_alias.py``)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import sysconfig
import types
import warnings
from pathlib import Path

import pytest

import _axolotl_otr_alias as alias

REPO = Path(__file__).resolve().parents[1]


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


def _hook_state(env: dict[str, str]) -> str:
    code = (
        "import sys, _axolotl_otr_alias as a; "
        "print(any(isinstance(f, a._Finder) for f in sys.meta_path))"
    )
    env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_environment_variable_turns_the_hook_off():
    assert _hook_state({alias.DISABLE_ENV: ""}) == "True"
    assert _hook_state({alias.DISABLE_ENV: "1"}) == "False"


@pytest.mark.integration
def test_editable_install_accepts_the_short_name(tmp_path):
    # A throwaway venv that sees this venv's packages (Axolotl, torch) through a path
    # line, so only this package is installed, editable, into it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(target, "zz_shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run([*pip, "--no-deps", "-e", str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import axolotl_otr, axolotl.integrations.base as b\n"
        "m = b.PluginManager.get_instance()\n"
        "m.register('axolotl_otr')\n"
        "print(axolotl_otr.__file__)\n"
        "print([type(p).__name__ for p in m.plugins.values()])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    where, plugins = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(REPO)), where  # the checkout itself, not a copy
    assert plugins == "['OTRPlugin']"
