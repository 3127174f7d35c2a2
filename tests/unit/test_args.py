"""The plugin's config keys: defaults, bounds, messages, and Axolotl's own loading."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from axolotl_otr.args import CONFLICTING_OPTIONS, OTRArgs


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


@pytest.mark.parametrize("option", sorted(CONFLICTING_OPTIONS))
def test_loss_replacing_options_are_refused_with_otr(option):
    with pytest.raises(ValidationError, match=f"cannot be combined with {option}"):
        OTRArgs(otr=True, **{option: True})
    OTRArgs(otr=False, **{option: True})  # without OTR nothing is refused


# ---- through Axolotl's own config loading (the path `axolotl train` takes) ------------


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
