"""The example configs derived from Axolotl's own examples train through `axolotl train`.

Each YAML of tests/support/family_configs.py ``FAMILY_CONFIGS`` is trained for two steps
on CPU on its tiny architecture twin (tests/support/families.py: same ``model_type``,
tied or untied as released), as `axolotl train` runs it. Only what the CPU and the twin
need is changed, each change in ``CPU_OVERRIDES`` / ``twin_overrides`` (the same module)
with its reason; every other setting (LoRA/QLoRA, 4-bit or 8-bit base, 8-bit optimizers,
sample packing, gradient checkpointing, chat templates, evaluation, warmup, the OTR
block) runs as written. The schema check of the same files with their GPU settings as
written is tests/e2e/test_example_configs.py.
"""

from __future__ import annotations

import math
import re

import pytest
import yaml
from safetensors.torch import load_file

from axolotl_otr.args import CONFLICTING_OPTIONS
from tests.support.axolotl_cli import REPO, run_axolotl_train, write_config
from tests.support.family_configs import (
    FAMILY_CONFIGS,
    build_twin,
    cpu_config,
    twin_data,
)

CONFIG_DIR = REPO / "examples" / "configs"
NAMES = sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_derived_config_says_where_it_comes_from_and_keeps_otr_on(name):
    """The header names the Axolotl example it was derived from and what was removed;
    the plugin and `otr: true` are there; nothing OTR refuses is left."""
    text = (CONFIG_DIR / name).read_text()
    header = text.split("\n\n", 1)[0]
    assert re.search(r"Derived from Axolotl's examples/\S+\.ya?ml", header), header
    assert "removed:" in header and "added:" in header
    raw = yaml.safe_load(text)
    assert raw["otr"] is True
    assert raw["plugins"][0] in ("axolotl_otr", "axolotl_otr.OTRPlugin")
    assert not [p for p in raw["plugins"] if "cut_cross_entropy" in p or "liger" in p.lower()]
    assert not [key for key in CONFLICTING_OPTIONS if raw.get(key)]
    assert name in (CONFIG_DIR / "README.md").read_text()


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_derived_config_trains_two_steps_on_its_twin(name, tiny_dir, tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    entry = FAMILY_CONFIGS[name]
    twin = build_twin(entry, tiny_dir / "model", tmp_path / "twin", raw["sequence_len"])
    data = twin_data(tiny_dir / "data" / "train.jsonl", entry.data, tmp_path / "data.jsonl")
    cfg = cpu_config(raw, twin, data, tmp_path)
    output, logs = run_axolotl_train(write_config(cfg, tmp_path / name))
    (tmp_path / "train.log").write_text(output)  # kept by pytest for a look afterwards

    # The plugin's trainer ran, on the chunked hidden-state path (the model's logits
    # measured equal to the fused computation at attach time).
    (line,) = [line for line in output.splitlines() if "OTR on (OTRAxolotlTrainer)" in line]
    assert "loss computed chunked from hidden states" in line, line
    steps = [log for log in logs if "loss" in log and "otr/ce" in log]
    assert len(steps) == 2, output[-3000:]
    for log in steps:
        assert math.isfinite(log["loss"]) and math.isfinite(log["otr/ce"]), log
        assert 0 <= log["otr/p_target"] <= 1, log
    # The adapter trained: lora_B starts at zero and moves only if a gradient reached it
    # (a config that freezes every parameter still runs its steps, with grad_norm 0).
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and sum(float(value.abs().sum()) for value in lora_b) > 0, sorted(adapter)[:4]
