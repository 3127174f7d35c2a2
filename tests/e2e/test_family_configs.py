"""The example configs derived from Axolotl's own examples train through `axolotl train`.

Each YAML of tests/family_configs.py ``FAMILY_CONFIGS`` is trained for two steps on CPU
on its tiny architecture twin (tests/families.py: same ``model_type``, tied or untied as
released), as `axolotl train` runs it. Only what the CPU and the twin need is changed,
each change in ``CPU_OVERRIDES`` / ``twin_overrides`` with its reason; every other
setting (LoRA/QLoRA, 4-bit or 8-bit base, 8-bit optimizers, sample packing, gradient
checkpointing, chat templates, evaluation, warmup, the OTR block) runs as written. The
schema check of the same files with their GPU settings as written is
tests/e2e/test_example_configs.py.
"""

from __future__ import annotations

import math
import re

import pytest
import yaml
from safetensors.torch import load_file

from axolotl_otr.args import CONFLICTING_OPTIONS
from tests.support.axolotl_cli import REPO, run_axolotl_train, write_config
from tests.support.family_configs import FAMILY_CONFIGS, build_twin, twin_data

CONFIG_DIR = REPO / "examples" / "configs"
NAMES = sorted(FAMILY_CONFIGS)

# What a CPU needs, applied only where the config sets the key (None removes the key).
CPU_OVERRIDES = {
    "bf16": False,  # bf16 autocast is a GPU setting here; the twin trains in fp32
    "bfloat16": None,  # the same, under its older name (Phi-3.5's example)
    "fp16": None,  # the same for fp16
    "tf32": False,  # a CUDA matmul mode
    "flash_attention": False,  # flash-attn is a CUDA kernel
    "attn_implementation": "sdpa",  # flash_attention_2 likewise; PyTorch's SDPA runs on CPU
    "fused_attn_kernel": False,  # Axolotl's Triton RMSNorm+RoPE kernel (CUDA only)
}
# Set always: Axolotl may turn its Triton LoRA kernels on by itself when a config names
# none (Qwen3-32B's names them), and the run must be short and local.
ALWAYS = {
    "lora_mlp_kernel": False,  # Axolotl's Triton LoRA kernels (CUDA only)
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "max_steps": 2,  # two optimizer steps, the point of the test
    "save_strategy": "no",  # no checkpoint mid-run; the final adapter is still written
    "dataloader_num_workers": 0,  # no worker processes on this 2-core machine
    "dataloader_pin_memory": False,  # pinned memory is a CUDA transfer setting
}


def twin_overrides(raw: dict, twin, data, tmp_path) -> dict:
    """What the twin needs: its local folder instead of the hub id, the tiny data (in
    the dataset's own layout) instead of the hub dataset, outputs in the tmp dir."""
    out = {"base_model": str(twin)}
    for key in ("base_model_config", "tokenizer_config"):
        if raw.get(key):
            out[key] = str(twin)  # the same hub id, written twice in some examples
    out["datasets"] = [
        {**dataset, "path": str(data), "ds_type": "json"} for dataset in raw["datasets"]
    ]
    out["dataset_prepared_path"] = str(tmp_path / "prepared")
    out["output_dir"] = str(tmp_path / "out")
    return out


def cpu_config(raw: dict, twin, data, tmp_path) -> dict:
    """``raw`` with the CPU and twin overrides applied, nothing else changed."""
    cfg = dict(raw)
    for key, value in CPU_OVERRIDES.items():
        if key in raw:
            cfg[key] = value
    if raw.get("gradient_checkpointing") == "offload":
        # Checkpointing kept; "offload" also moves activations from the accelerator to
        # host memory (TRL's offloading asks torch.accelerator, which a CPU has not).
        cfg["gradient_checkpointing"] = True
    cfg.update(ALWAYS)
    cfg.update(twin_overrides(raw, twin, data, tmp_path))
    return {key: value for key, value in cfg.items() if value is not None}


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
