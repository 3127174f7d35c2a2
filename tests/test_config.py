"""The plugin's config keys: defaults, bounds, messages, and Axolotl's own loading."""

from __future__ import annotations

import math

import pytest
from conftest import write_config
from pydantic import ValidationError

from axolotl_otr.args import CONFLICTING_OPTIONS, OTRArgs
from axolotl_otr.objective import Objective, OTRConfigError, OTRSettings


def test_defaults_are_the_documented_ones():
    args = OTRArgs()
    assert args.otr is None
    assert args.otr_num_samples == 256
    assert args.otr_temperature == 1.3
    assert args.otr_beta == -0.1
    assert args.otr_estimator == "sampled"
    assert args.otr_normalization == "token"
    assert args.otr_objective == "otr"
    assert args.otr_sft_mix == 0.0


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("otr_num_samples", 0, "[1, "),
        ("otr_num_samples", 1 << 21, "[1, "),
        ("otr_num_samples", True, "integer"),
        ("otr_num_samples", "many", "integer"),
        ("otr_temperature", 0, "(0, 100"),
        ("otr_temperature", -1.3, "(0, 100"),
        ("otr_temperature", 101, "(0, 100"),
        ("otr_temperature", math.nan, "(0, 100"),
        ("otr_beta", 1.0, "[-1.0, 1)"),
        ("otr_beta", -2, "[-1.0, 1)"),
        ("otr_beta", math.inf, "[-1.0, 1)"),
        ("otr_estimator", "greedy", "'sampled' or 'exact'"),
        ("otr_normalization", "batch", "'token' or 'sequence'"),
        ("otr_objective", "ppo", "'otr', 'dft' or 'sft'"),
        ("otr_chunk_size", 0, "positive"),
        ("otr_sft_mix", -0.1, "[0, 1]"),
        ("otr_sft_mix", 1.5, "[0, 1]"),
        ("otr_sft_mix", math.nan, "[0, 1]"),
    ],
)
def test_every_bad_value_names_the_key_and_range(key, value, expected):
    with pytest.raises(ValidationError) as info:
        OTRArgs(**{key: value})
    text = str(info.value)
    assert key in text
    assert expected in text


@pytest.mark.parametrize(
    "key,value",
    [
        ("otr_num_samples", 1),
        ("otr_num_samples", 1 << 20),
        ("otr_temperature", 100.0),
        ("otr_temperature", 1e-3),
        ("otr_beta", -1.0),
        ("otr_beta", 0.99),
        ("otr_sft_mix", 0.0),
        ("otr_sft_mix", 1.0),
    ],
)
def test_bounds_are_inclusive_where_documented(key, value):
    assert getattr(OTRArgs(**{key: value}), key) == value


def test_sft_mix_with_another_objective_is_refused():
    with pytest.raises(ValidationError, match="otr_sft_mix"):
        OTRArgs(otr_sft_mix=0.3, otr_objective="dft")


@pytest.mark.parametrize("option", sorted(CONFLICTING_OPTIONS))
def test_loss_replacing_options_are_refused_with_otr(option):
    with pytest.raises(ValidationError, match=f"cannot be combined with {option}"):
        OTRArgs(otr=True, **{option: True})
    OTRArgs(otr=False, **{option: True})  # without OTR nothing is refused


def test_settings_read_from_a_config_fall_back_to_defaults_and_seed():
    settings = OTRSettings.from_cfg({"otr": True, "seed": 7, "otr_beta": -0.3})
    assert settings.objective.beta == -0.3
    assert settings.objective.num_samples == 256
    assert settings.seed == 7
    assert OTRSettings.from_cfg({"otr": True, "seed": 7, "otr_seed": 9}).seed == 9


# ---- through Axolotl's own config loading (the path `axolotl train` takes) ------------


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
    with pytest.raises(ValidationError, match="otr_temperature must be in"):
        load_cfg(str(path))


def test_conflicting_loss_option_fails_at_axolotl_config_load(load_cfg, tiny_config, tmp_path):
    path = write_config(tiny_config(use_eaft=True), tmp_path / "c.yml")
    with pytest.raises(ValidationError, match="cannot be combined with use_eaft"):
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


def test_schema_choices_and_defaults_are_those_of_objective_py():
    from typing import get_args

    from axolotl_otr import objective as o

    fields = OTRArgs.model_fields
    defaults = o.OTRSettings()
    assert get_args(fields["otr_objective"].annotation) == o.OBJECTIVES
    assert get_args(fields["otr_estimator"].annotation) == o.ESTIMATORS
    assert get_args(fields["otr_normalization"].annotation) == o.NORMALIZATIONS
    args = OTRArgs()
    assert args.otr_objective == defaults.objective.kind
    assert args.otr_num_samples == defaults.objective.num_samples
    assert args.otr_temperature == defaults.objective.temperature
    assert args.otr_beta == defaults.objective.beta
    assert args.otr_estimator == defaults.objective.estimator
    assert args.otr_sft_mix == defaults.objective.sft_mix
    assert args.otr_normalization == defaults.normalization
    assert args.otr_fused == defaults.fused
    assert args.otr_chunk_size == defaults.chunk_size
    # A config read through the schema gives the same settings as the defaults.
    assert o.OTRSettings.from_cfg({**args.model_dump(), "seed": o.DEFAULT_SEED}) == defaults


def test_objective_keeps_its_positional_name_and_keywords():
    objective = Objective("otr", num_samples=8, temperature=1.0, beta=-0.2,
                          estimator="exact", sft_mix=0.1)  # fmt: skip
    assert objective.kind == "otr" and objective.num_samples == 8
    assert Objective("sft").kind == "sft"
    with pytest.raises(OTRConfigError, match="otr_objective"):
        Objective("ppo")


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
