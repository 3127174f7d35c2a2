"""The settings (``objective.py``): combinations refused, settings read from a config,
and ``Objective``'s stable signature.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from axolotl_otr.args import OTRArgs
from axolotl_otr.objective import Objective, OTRConfigError, OTRSettings


def test_sft_mix_with_another_objective_is_refused():
    with pytest.raises(ValidationError, match="otr_sft_mix"):
        OTRArgs(otr_sft_mix=0.3, otr_objective="dft")


def test_settings_read_from_a_config_fall_back_to_defaults_and_seed():
    settings = OTRSettings.from_cfg({"otr": True, "seed": 7, "otr_beta": -0.3})
    assert settings.objective.beta == -0.3
    assert settings.objective.num_samples == 256
    assert settings.seed == 7
    assert OTRSettings.from_cfg({"otr": True, "seed": 7, "otr_seed": 9}).seed == 9


def test_objective_keeps_its_positional_name_and_keywords():
    objective = Objective("otr", num_samples=8, temperature=1.0, beta=-0.2,
                          estimator="exact", sft_mix=0.1)  # fmt: skip
    assert objective.kind == "otr" and objective.num_samples == 8
    assert Objective("sft").kind == "sft"
    with pytest.raises(OTRConfigError, match="otr_objective"):
        Objective("ppo")
