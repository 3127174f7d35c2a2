"""The plugin (``plugin.py``) loaded by Axolotl's own config loader in this process: both
spellings, refusals at load, inert without ``otr``, the trainer class it hands over.
"""

from __future__ import annotations

import pytest

from tests.support.axolotl_cli import write_config


@pytest.fixture
def load_cfg():
    from axolotl.cli.config import load_cfg as axolotl_load_cfg

    return axolotl_load_cfg


@pytest.mark.parametrize("spelling", ["axolotl_otr.OTRPlugin", "axolotl_otr"])
def test_both_plugin_spellings_load_through_axolotl(load_cfg, tiny_config, tmp_path, spelling):
    cfg = load_cfg(str(write_config(tiny_config(plugins=[spelling]), tmp_path / "c.yml")))
    assert cfg.otr is True
    assert cfg.otr_num_samples == 256
    assert cfg.otr_temperature == 1.3
    from axolotl.integrations.base import PluginManager

    plugins = PluginManager.get_instance().plugins
    assert "axolotl_otr.OTRPlugin" in plugins
    assert "axolotl_otr" not in plugins  # one canonical registration, never two


def test_bad_value_fails_at_axolotl_config_load(load_cfg, tiny_config, tmp_path):
    path = write_config(tiny_config(otr_temperature=0), tmp_path / "c.yml")
    # The plugin's register hook refuses it (one line) before Axolotl's pydantic model does.
    with pytest.raises(ValueError, match="^otr_temperature must be in"):
        load_cfg(str(path))


def test_conflicting_loss_option_fails_at_axolotl_config_load(load_cfg, tiny_config, tmp_path):
    path = write_config(tiny_config(use_eaft=True), tmp_path / "c.yml")
    with pytest.raises(ValueError, match="cannot be combined with use_eaft"):
        load_cfg(str(path))


def test_plugin_is_inert_without_otr():
    from transformers import Trainer

    from axolotl_otr import OTRPlugin

    class Stub:
        compute_loss_func = None
        compute_loss = Trainer.compute_loss
        log = Trainer.log

    trainer = Stub()
    before = dict(vars(trainer))
    for cfg in ({"otr": False}, {}, {"otr": None}):
        OTRPlugin().post_trainer_create(cfg, trainer)
    assert dict(vars(trainer)) == before
    assert trainer.compute_loss_func is None
    for cfg in ({"otr": False}, {}, {"otr": None}):
        assert OTRPlugin().get_trainer_cls(cfg) is None


def test_plugin_hands_axolotl_its_trainer_with_the_otr_mixin():
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.utils.dict import DictDefault

    from axolotl_otr import OTRPlugin
    from axolotl_otr.trainer import OTRTrainerMixin

    cfg = DictDefault({"otr": True, "base_model": "x", "model_config_type": "llama"})
    cls = OTRPlugin().get_trainer_cls(cfg)
    assert issubclass(cls, OTRTrainerMixin) and issubclass(cls, AxolotlTrainer)
    assert cls.__mro__[1:3] == (OTRTrainerMixin, AxolotlTrainer)
    assert OTRPlugin().get_trainer_cls(cfg) is cls  # one class, not one per run


def test_otr_without_the_plugin_is_never_silently_plain_cross_entropy(
    load_cfg, tiny_config, tmp_path
):
    from importlib.metadata import version

    cfg = tiny_config()
    cfg.pop("plugins")
    path = write_config(cfg, tmp_path / "c.yml")
    if version("axolotl").startswith("0.19."):
        # 0.19 loads only listed plugins and drops unknown keys: refuse instead.
        with pytest.raises(ValueError, match="OTR plugin is not loaded"):
            load_cfg(str(path))
    else:
        # 0.20+ registers the installed entry point in every run: the keys are kept.
        loaded = load_cfg(str(path))
        assert loaded.otr is True and loaded.otr_num_samples == 256
