"""A careless config is refused at load, in one line (issue 35, items 1, 2 and 5):
misspelt otr keys with the closest valid key, one rule for quoted numbers, the
conflicting-option refusal that says what to do; through Axolotl's own loader in this
process, with and without the ``plugins:`` line (Axolotl 0.19 and 0.21).
"""

from __future__ import annotations

import pytest

from axolotl_otr.args import CONFLICTING_OPTIONS, OTRArgs, check_config
from axolotl_otr.objective import CONFIG_KEYS, OTRConfigError, check_known_keys, is_otr_key

MISSPELT = {
    "OTR": "otr",
    "Otr_beta": "otr_beta",
    "otr_temprature": "otr_temperature",
    "otr-beta": "otr_beta",
    "otr_num_sample": "otr_num_samples",
    "use_otr": "otr",
}


def test_the_key_list_is_the_schemas():
    assert set(CONFIG_KEYS) == set(OTRArgs.model_fields)


@pytest.mark.parametrize("key,closest", sorted(MISSPELT.items()))
def test_a_misspelt_otr_key_is_refused_with_the_closest_key(key, closest):
    with pytest.raises(OTRConfigError, match=f"`{key}`.*did you mean `{closest}`\\?$"):
        check_config({"otr": True, key: 2.0})


def test_other_keys_pass_even_with_otr_inside_a_word():
    assert not any(is_otr_key(key) for key in ("nemotron_h_layers", "motr", "lr", "rotary"))
    check_known_keys(["nemotron_h_layers", "learning_rate", *CONFIG_KEYS])


NUMERIC = {
    # key: (a good value as YAML gives it unquoted, the same quoted, a bad quoted value)
    "otr_num_samples": (8, "8", "1e3"),
    "otr_chunk_size": (64, "64", "6.4e1"),
    "otr_seed": (7, "7", "seven"),
    "otr_temperature": (2.0, "2e0", "hot"),
    "otr_beta": (-0.2, "-0.2", "-"),
    "otr_sft_mix": (0.5, "5e-1", "half"),
}


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_every_numeric_key_reads_a_quoted_number_and_refuses_the_rest_alike(key):
    value, quoted, bad = NUMERIC[key]
    # PyYAML reads `2e0` or `5e-1` (no dot) as strings: taken for every numeric key...
    assert getattr(OTRArgs(**{key: quoted}), key) == getattr(OTRArgs(**{key: value}), key)
    # ...and anything else refused in one form: "<key> must be ..., got <value>".
    for wrong in (bad, True):
        with pytest.raises(OTRConfigError, match=f"^{key} must be .*, got {wrong!r}$"):
            check_config({key: wrong})


def test_an_integer_key_takes_no_fraction_whatever_its_spelling():
    for key in ("otr_num_samples", "otr_chunk_size", "otr_seed"):
        for value in (8.0, "8.0", 8.5):
            with pytest.raises(OTRConfigError, match=f"^{key} must be"):
                check_config({key: value})
    # A quoted "nan" reads as a number, then fails the range like an unquoted one.
    with pytest.raises(OTRConfigError, match="^otr_temperature must be in"):
        check_config({"otr_temperature": "nan"})


@pytest.mark.parametrize("option", sorted(CONFLICTING_OPTIONS))
def test_a_conflicting_option_is_refused_saying_to_delete_its_line(option):
    with pytest.raises(OTRConfigError) as info:
        check_config({"otr": True, option: "dpo" if option == "rl" else True})
    message = str(info.value)
    assert message.endswith(f"Delete the `{option}` line from the config, or set otr: false.")
    assert "to false" not in message and "\n" not in message


# ---- through Axolotl's own config loading (the path `axolotl train` takes) ------------


@pytest.fixture
def load_cfg():
    from axolotl.cli.config import load_cfg as axolotl_load_cfg

    return axolotl_load_cfg


@pytest.mark.parametrize("with_plugins", [True, False], ids=["plugins", "no-plugins"])
@pytest.mark.parametrize("key", ["otr_temprature", "OTR", "Otr_beta", "otr-beta"])
def test_axolotl_refuses_a_misspelt_key_with_or_without_the_plugins_line(
    load_cfg, tiny_config, tmp_path, key, with_plugins
):
    from tests.support.axolotl_cli import write_config

    cfg = tiny_config(**{key: 2.0})
    if not with_plugins:
        cfg.pop("plugins")
    with pytest.raises(ValueError, match=f"did you mean `{MISSPELT[key]}`"):
        load_cfg(str(write_config(cfg, tmp_path / "c.yml")))


def test_axolotl_takes_a_dotless_exponent_for_every_numeric_key(load_cfg, tiny_config, tmp_path):
    from tests.support.axolotl_cli import write_config

    cfg = tiny_config()
    cfg.pop("otr_num_samples")
    path = write_config(cfg, tmp_path / "c.yml")
    path.write_text(
        path.read_text() + "otr_sft_mix: 1e-1\notr_chunk_size: '64'\notr_num_samples: '8'\n"
    )
    loaded = load_cfg(str(path))
    assert (loaded.otr_sft_mix, loaded.otr_chunk_size, loaded.otr_num_samples) == (0.1, 64, 8)
