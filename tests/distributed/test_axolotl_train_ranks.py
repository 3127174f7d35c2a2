"""`axolotl train` with 2 processes (gloo, CPU) under DDP, DeepSpeed ZeRO-3 and FSDP2, OTR on.

Each run is Axolotl's own training entry point in every process of a ``torchrun``
launch, through ``tests/support/cpu_launch.py`` (which says what it changes for a machine
without GPUs). All runs start from one saved LoRA adapter (``lora_model_dir``: Axolotl
does not seed the adapter's initialization), train 2 optimizer steps on the tiny model
with the exact estimator (no per-process draws), and save a checkpoint after each step
(``trainer_state.json`` keeps the logged values at full precision; the console prints 4
digits). Against one process with the same global batch (8 sequences per step: 1 x 8
against 2 processes x 2 micro-batches of 2):

- the loss path, read from the log of every process: chunked from hidden states (the
  fused path), never "from full logits", and each process turned on token counting over
  processes (``average_tokens_across_devices``: Axolotl sets it false);
- finite losses, and the adapter moved from the saved one;
- 2 processes = 1 process: logged losses and ``otr/*`` to 1e-5, the trained LoRA weights
  (the final adapter each run saved) to 1e-4;
- the engine really ran: ZeRO-3's checkpoints hold one stage-3 partition per process;
  FSDP2's are accelerate's FSDP checkpoints, and its adapter Axolotl's FSDP2 gather;
- save and resume: ZeRO-3 resumed from its step-1 checkpoint repeats step 2's logged
  values and ends with the same adapter;
- ``axolotl merge-lora`` of the ZeRO-3 adapter writes base + adapter.

Not here, because other tests cover it: the CE control (``otr: false``) and step 1's
``otr/ce`` against it (``tests/e2e/test_axolotl_train.py``, one process; ``otr/ce`` of 2
processes = 1 process is asserted here), the HF Trainer under each engine and the head's
gathers (``test_engines.py``), sampled draws on resume (``test_axolotl_train.py``).
FSDP2's checkpoint save works here: issue 34 saw PEFT's ``save_pretrained`` fail with
"Attempted to access the data pointer on an invalid python storage"; that failure comes
from switching accelerate's state to FSDP after Axolotl built the Trainer (reproduced on
CPU with a plugin's ``post_trainer_create`` doing it), not from the CPU: with the state
FSDP's from its creation (``cpu_launch.py`` change 5, as accelerate sets it on GPUs)
the checkpoints and the final adapter save.

Cost: 5 launches of ``axolotl train`` (1 process, DDP, ZeRO-3, FSDP2, ZeRO-3 resumed)
and one ``merge-lora``: 4.4 min wall on 2 cores shared with other jobs (load average
3-4; 6.4 min at 4.5-5); DeepSpeed's compiled op reused from torch's extension cache
(``test_engines.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed.engine_worker import deepspeed_config
from tests.support.axolotl_cli import TINY_CONFIG, run_axolotl, write_config
from tests.support.cpu_launch import CPU_KEYS
from tests.support.torchrun import torchrun

# One xdist worker runs the whole file: its module fixtures are built once (Makefile).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_axolotl_train_ranks")]

LAUNCHER = "tests.support.cpu_launch"
STEPS = 2
FUSED = "loss computed chunked from hidden states"
COUNTED = "otr: average_tokens_across_devices set to true (2 processes)"
FSDP2_KEYS = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    },
}
COMPARED = ("loss", "otr/ce", "otr/p_target", "otr/hit_rate", "otr/entropy")


def make_config(tiny_dir: Path, adapter: Path, out: Path, **overrides) -> Path:
    """The shipped tiny config, from the saved adapter, 2 steps, a checkpoint per step."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    del cfg["lora_target_linear"]  # the adapter's own modules
    cfg.update(
        base_model=str(tiny_dir / "model"),
        datasets=[{**cfg["datasets"][0], "path": str(tiny_dir / "data" / "train.jsonl")}],
        # each run prepares its own: a fresh and a cached dataset can differ in order
        dataset_prepared_path=str(out / "prepared"),
        output_dir=str(out / "out"),
        lora_model_dir=str(adapter),
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        otr_estimator="exact",
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler="constant",
        warmup_steps=0,
        save_strategy="steps",
        save_steps=1,
        **CPU_KEYS,
    )
    cfg.update(overrides)
    out.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out / "config.yml")


def train(config: Path, processes: int) -> dict:
    """One `axolotl train` launch; its output, logged values and final adapter."""
    from safetensors.torch import load_file

    proc = torchrun(LAUNCHER, [config], processes, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {
        "output": output,
        "out": out,
        "logs": [log for log in state["log_history"] if "loss" in log],
        "adapter": load_file(out / "adapter_model.safetensors"),
    }


@pytest.fixture(scope="module")
def runs(tiny_dir, adapter, tmp_path_factory) -> dict:
    """1 process (8 sequences per micro-batch), DDP and ZeRO-3 (2 x 2 x 2 sequences)."""
    root = tmp_path_factory.mktemp("ranks")
    two = dict(micro_batch_size=2, gradient_accumulation_steps=2)
    configs = {
        "one": make_config(
            tiny_dir, adapter, root / "one", micro_batch_size=8, gradient_accumulation_steps=1
        ),
        "ddp": make_config(tiny_dir, adapter, root / "ddp", **two),
        "zero3": make_config(
            tiny_dir, adapter, root / "zero3", deepspeed=deepspeed_config(3), **two
        ),
        "fsdp2": make_config(tiny_dir, adapter, root / "fsdp2", **FSDP2_KEYS, **two),
    }
    return {
        name: train(config, 1 if name == "one" else 2) | {"config": config}
        for name, config in configs.items()
    }


def values(run: dict, key: str) -> list[float]:
    return [log[key] for log in run["logs"]]


@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_every_process_takes_the_fused_path_and_counts_tokens_globally(runs, engine):
    output = runs[engine]["output"]
    # one line per process, counted in the whole output: two processes' lines can meet
    # on one line of the shared pipe
    assert output.count("OTR on (") == 2, output[-3000:]
    assert output.count(FUSED) == 2, output[-3000:]
    assert "loss computed from full logits" not in output
    assert output.count(COUNTED) == 2, output[-3000:]
    one = runs["one"]["output"]
    assert FUSED in one and "average_tokens_across_devices set to true" not in one


@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_two_processes_train_as_one_process_with_the_global_batch(runs, adapter, engine):
    from safetensors.torch import load_file

    run, one = runs[engine], runs["one"]
    assert len(run["logs"]) == STEPS and len(one["logs"]) == STEPS
    assert all(math.isfinite(x) for x in values(run, "loss"))
    for key in COMPARED:
        assert values(run, key) == pytest.approx(values(one, key), rel=1e-5, abs=1e-5), key
    start = load_file(adapter / "adapter_model.safetensors")
    assert run["adapter"].keys() == one["adapter"].keys() == start.keys()
    moved = 0.0
    for key, weight in run["adapter"].items():
        torch.testing.assert_close(weight, one["adapter"][key], rtol=0, atol=1e-4, msg=key)
        moved = max(moved, float((weight - start[key]).abs().max()))
    assert moved > 1e-3, "the adapter did not move"


def test_zero3_checkpoints_hold_one_stage_3_partition_per_process(runs):
    step = runs["zero3"]["out"] / "checkpoint-1" / "global_step1"
    partitions = sorted(step.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(partitions) == 2, sorted(p.name for p in step.iterdir())
    state = torch.load(partitions[0], map_location="cpu", weights_only=False)
    optimizer = state["optimizer_state_dict"]
    assert optimizer["zero_stage"] == 3 and optimizer["partition_count"] == 2


def test_fsdp2_checkpoints_are_fsdps_own(runs):
    """FSDP really ran (not a silent DDP): the Trainer saved its checkpoints through
    accelerate's FSDP save, and the final adapter through Axolotl's FSDP2 gather."""
    checkpoint = runs["fsdp2"]["out"] / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), sorted(checkpoint.iterdir())
    assert not (runs["ddp"]["out"] / "checkpoint-1" / "pytorch_model_fsdp.bin").exists()
    assert "Saved FSDP2-gathered LoRA adapter" in runs["fsdp2"]["output"]


def test_zero3_resumed_from_step_1_repeats_step_2(runs, tmp_path):
    zero3 = runs["zero3"]
    cfg = yaml.safe_load(zero3["config"].read_text())
    cfg.update(
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
        resume_from_checkpoint=str(zero3["out"] / "checkpoint-1"),
    )
    resumed = train(write_config(cfg, tmp_path / "config.yml"), 2)
    assert len(resumed["logs"]) == STEPS  # step 1 from the checkpoint's state, step 2 new
    for key in COMPARED:
        assert resumed["logs"][-1][key] == pytest.approx(
            zero3["logs"][-1][key], rel=1e-5, abs=1e-5
        ), key
    for key, weight in resumed["adapter"].items():
        torch.testing.assert_close(weight, zero3["adapter"][key], rtol=0, atol=1e-5, msg=key)


def test_merge_lora_of_the_zero3_adapter_is_base_plus_adapter(runs, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zero3 = runs["zero3"]
    out = zero3["out"]
    # merge-lora is one process; Axolotl 0.19 sets up DeepSpeed's process group (nccl)
    # for any config with a `deepspeed` key, which cannot start without a GPU
    cfg = yaml.safe_load(zero3["config"].read_text())
    del cfg["deepspeed"]
    config = write_config(cfg, tmp_path / "merge.yml")
    output, _ = run_axolotl(["merge-lora", str(config), "--lora-model-dir", str(out)])
    merged_dir = out / "merged"
    assert (merged_dir / "config.json").is_file(), output[-3000:]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(out)).merge_and_unload()(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
