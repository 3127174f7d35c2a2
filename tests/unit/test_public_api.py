"""The public names (``axolotl_otr/__init__.py``) are where users import them from.

Both plugin spellings through ``axolotl train`` are run by
``tests/e2e/test_axolotl_train.py`` (``axolotl_otr`` in the shipped configs,
``axolotl_otr.OTRPlugin`` in ``test_long_plugin_spelling_trains_with_otr``) and the installed wheel
by ``tests/e2e/test_install.py``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "OTRPlugin": "axolotl_otr.plugin",
    "OTRArgs": "axolotl_otr.args",
    "OTRSettings": "axolotl_otr.objective",
    "Objective": "axolotl_otr.objective",
    "OTRConfigError": "axolotl_otr.objective",
    "install_otr": "axolotl_otr.trainer.mixin",
    "with_otr": "axolotl_otr.trainer.mixin",
    "OTRTrainerMixin": "axolotl_otr.trainer.mixin",
    "otr_loss": "axolotl_otr.loss",
    "otr_loss_from_hidden": "axolotl_otr.loss",
    "select_targets": "axolotl_otr.loss",
    "stats_to_metrics": "axolotl_otr.metrics",
}


def test_the_documented_imports_work():
    from axolotl_otr import OTRPlugin, OTRSettings, install_otr, otr_loss

    assert callable(install_otr) and callable(otr_loss)
    assert OTRPlugin.__name__ == "OTRPlugin" and OTRSettings.__name__ == "OTRSettings"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_is_its_defining_modules_object(name):
    import axolotl_otr

    assert name in axolotl_otr.__all__
    defined = getattr(importlib.import_module(PUBLIC[name]), name)
    assert getattr(axolotl_otr, name) is defined
    assert defined.__module__ == PUBLIC[name]


def test_the_trainer_package_keeps_its_import_path():
    from axolotl_otr.trainer import OTRTrainerMixin, install_otr, with_otr
    from axolotl_otr.trainer.mixin import install_otr as defined

    assert install_otr is defined and with_otr(object).__mro__[1] is OTRTrainerMixin


def test_the_old_trainer_hook_module_is_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("axolotl_otr.trainer_hook")


def test_importing_the_package_loads_neither_axolotl_nor_the_trainer():
    code = (
        "import sys, axolotl_otr; "
        "print(sorted(m for m in sys.modules if m.startswith(('axolotl.', 'axolotl_otr.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
