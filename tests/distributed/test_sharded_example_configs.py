"""The FSDP2 and DeepSpeed ZeRO-3 example configs train 2 steps with 2 processes on CPU.

``examples/configs/llama-3-70b-otr-qlora-{fsdp2,zero3}.yml`` run as their tiny twins (the
tiny Llama of ``tests/support/family_configs.py``, the tiny alpaca data) through
``axolotl train``'s entry point in each process of a 2-process ``torchrun`` launch
(``tests/support/cpu_launch.py``). The twin is ``tests/e2e/test_family_configs.py``'s
``cpu_config`` (what a CPU and a twin need, each with its reason), plus what a CPU
machine needs for these engines with 2 processes (``ENGINE_TWIN``, each with its reason);
the engine blocks, the OTR block, the optimizer, gradient checkpointing, evaluation and
saving run as written. Asserted: every process attached OTR on the fused path and counts
tokens over processes, both steps' logs finite, the adapter trained, and the engine
really ran (its own checkpoint files).

Cost: 2 launches, 2.0 min wall on 2 cores shared with other jobs (load average 3-4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.support.axolotl_cli import REPO, write_config
from tests.support.cpu_launch import CPU_KEYS
from tests.support.examples import parse_logs
from tests.support.family_configs import (
    LLAMA3_PAD,
    FamilyConfig,
    build_twin,
    cpu_config,
    twin_data,
)
from tests.support.torchrun import torchrun

pytestmark = pytest.mark.integration

CONFIG_DIR = REPO / "examples" / "configs"
FSDP2 = "llama-3-70b-otr-qlora-fsdp2.yml"
ZERO3 = "llama-3-70b-otr-qlora-zero3.yml"
TWIN = FamilyConfig("llama", LLAMA3_PAD)  # a Llama 3 base: its pad token in the tokenizer

# QLoRA's 4-bit base is dropped for LoRA on the same full-precision twin, under both
# engines: under FSDP, Axolotl 0.19 loads a QLoRA model with ``device_map`` set to
# ``{"": LOCAL_RANK}`` (``loaders/model.py`` ``_set_device_map_config``; no key changes
# it), an accelerator index a CPU machine has not; under ZeRO-3 the 4-bit base keeps
# bf16 tensors beside the fp32 ones the CPU twin trains in (bf16 is a GPU setting here),
# and DeepSpeed's all-gather after the optimizer step refuses the mix on gloo.
NO_4BIT = {"adapter": "lora", "load_in_4bit": False}
ENGINE_TWIN = {
    # FSDP2's CPU offload of the parameters is kept; pinning the host memory needs an
    # accelerator (torch's pin_memory), and Axolotl has a key for it.
    FSDP2: {"fsdp_config": {"cpu_offload_pin_memory": False}},
    ZERO3: {},
}


def twin_config(name: str, tiny_dir: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    twin = build_twin(TWIN, tiny_dir / "model", tmp_path / "twin", raw["sequence_len"])
    data = twin_data(tiny_dir / "data" / "train.jsonl", TWIN.data, tmp_path / "data.jsonl")
    cfg = cpu_config(raw, twin, data, tmp_path)
    cfg.update(NO_4BIT, **CPU_KEYS)
    for key, value in ENGINE_TWIN[name].items():
        cfg[key] = {**cfg[key], **value}
    if "deepspeed" in raw:
        # the example's JSON, with bf16 off as cpu_config turns it off (DeepSpeed refuses
        # a JSON whose bf16 disagrees with the Trainer's)
        ds = json.loads((REPO / raw["deepspeed"]).read_text())
        ds["bf16"]["enabled"] = False
        cfg["deepspeed"] = str(write_json(ds, tmp_path / "deepspeed.json"))
    return write_config(cfg, tmp_path / name)


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.mark.parametrize("name", [FSDP2, ZERO3])
def test_sharded_example_trains_two_steps_on_its_twin_with_two_processes(name, tiny_dir, tmp_path):
    proc = torchrun("tests.support.cpu_launch", [twin_config(name, tiny_dir, tmp_path)], 2, 900)
    output = proc.stdout + proc.stderr
    (tmp_path / "train.log").write_text(output)  # kept by pytest for a look afterwards
    assert proc.returncode == 0, output[-6000:]

    # one line per process, counted in the whole output: two processes' lines can meet
    # on one line of the shared pipe
    assert output.count("OTR on (") == 2, output[-3000:]
    assert output.count("loss computed chunked from hidden states") == 2, output[-3000:]
    assert output.count("average_tokens_across_devices set to true (2 processes)") == 2
    steps = [log for log in parse_logs(output) if "loss" in log and "otr/ce" in log]
    assert len(steps) == 2, output[-3000:]
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["otr/ce"]) for log in steps)
    # lora_B starts at zero and moves only if a gradient reached it
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and sum(float(value.abs().sum()) for value in lora_b) > 0
    checkpoint = tmp_path / "out" / "checkpoint-1"
    if name == FSDP2:  # accelerate's FSDP checkpoint, Axolotl's FSDP2 adapter gather
        assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), sorted(checkpoint.iterdir())
        assert "Saved FSDP2-gathered LoRA adapter" in output
    else:  # one ZeRO partition per process
        assert len(list(checkpoint.glob("global_step1/zero_pp_rank_*_optim_states.pt"))) == 2
