"""OTR under the data-parallel engines the HF Trainer runs: DDP, FSDP2, DeepSpeed ZeRO-2, ZeRO-3.

Two gloo processes on CPU train a LoRA adapter on the tiny Llama through the HF Trainer
(``engine_worker.py``, which says what it patches for a machine without GPUs), once with
plain cross-entropy (the control) and once with OTR, from one saved adapter. Against one
process with the same global batch (16 sequences, 8 per optimizer step, 2 steps):

- both runs finite, and the adapter moved; an evaluation after training gives the
  same ``eval_loss`` and ``eval_otr/*`` (the same route as training's loss);
- OTR's first-step ``otr/ce`` is the control's first-step loss (the same batch and
  model, measured before the first update) to 1e-4;
- 2 processes = 1 process: logged losses to 1e-5, trained LoRA weights to 1e-4;
- the loss path: the hidden-state path under every engine (before issue 34, FSDP2 and
  ZeRO-3 took the full-logits path; under ZeRO-3 the model is partitioned as it loads,
  as Axolotl loads it, and the exactness check runs on it), with the whole lm_head
  gathered once per loss under ZeRO-3 (chunks of 16 positions: several per micro-batch,
  twice as many per evaluation batch), counted at DeepSpeed's own gather entry points,
  and reused from the forward under FSDP2 (``axolotl_otr/model/sharding.py``), where a
  LoRA parameter is a DTensor during training (the model really sharded) and the unit
  owning the head was found; the all-gathers of that unit are counted per optimizer
  step for OTR and the control (FSDP2's public ``set_custom_all_gather``).

Cost: one launch per engine plus the reference, 2 min for four of them (before ZeRO-2
was added) on 2 quiet CPU cores (5.5 min under a load average of 5-7); ZeRO-2 alone with
the reference 1 min 46 s under load; the first DeepSpeed launch on a machine compiles a
C++ op (80-110 s), which torch caches in ``~/.cache/torch_extensions`` (or
``TORCH_EXTENSIONS_DIR``) for every later run and clone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support.torchrun import torchrun

# One xdist worker runs the whole file: its module fixtures are built once (Makefile).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_engines")]

WORKER = "tests.distributed.engine_worker"
SHARDED = {"fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}
MICRO_BATCHES_PER_PROCESS = 2 * 2  # 2 steps x 2 accumulation micro-batches
EVAL_BATCHES_PER_PROCESS = 1  # 8 sequences, 2 processes, 4 per batch


def launch(engine: str, processes: int, micro_batch: int, accumulation: int, tiny, adapter, out):
    # DeepSpeed's compiled op goes where torch keeps extensions (TORCH_EXTENSIONS_DIR, by
    # default ~/.cache/torch_extensions): built once per machine, kept across clones.
    args = [engine, tiny / "model", adapter, out, micro_batch, accumulation]
    proc = torchrun(WORKER, args, processes, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tiny_dir, adapter, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "runs.pt"
    return launch("ddp", 1, 8, 1, tiny_dir, adapter, out)


def losses(run: dict, key: str = "loss") -> list[float]:
    return [log[key] for log in run["logs"] if key in log]


def initial_weights(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_train_as_one_with_the_fused_loss(
    engine, tiny_dir, adapter, one_process, tmp_path
):
    two = launch(engine, 2, 2, 2, tiny_dir, adapter, tmp_path / "runs.pt")
    start = initial_weights(adapter)
    for name in ("ce", "otr"):
        run, reference = two[name], one_process[name]
        assert run["world"] == 2 and reference["world"] == 1
        assert len(losses(run)) == 2 and all(math.isfinite(x) for x in losses(run)), name
        assert losses(run) == pytest.approx(losses(reference), abs=1e-5), name
        assert run["weights"].keys() == reference["weights"].keys()
        moved = 0.0
        for key, weight in run["weights"].items():
            torch.testing.assert_close(
                weight, reference["weights"][key], rtol=0, atol=1e-4, msg=f"{name} {key}"
            )
            moved = max(moved, float((weight - start[key.replace(".default", "")]).abs().max()))
        assert moved > 1e-3, f"{name}: the adapter did not move"
        assert run["eval"].keys() == reference["eval"].keys() and run["eval"]["eval_loss"]
        for key, value in reference["eval"].items():  # evaluation takes the same route
            assert run["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    assert losses(two["otr"], "otr/ce")[0] == pytest.approx(losses(two["ce"])[0], rel=1e-4)
    # the loss path: hidden states under every engine, the head whole once per micro-batch
    otr = two["otr"]
    assert otr["partitioned_at_load"] == (engine == "zero3")  # zero.Init, as under Axolotl
    assert otr["fused"], otr["reason"]
    assert otr["sharded"] == SHARDED.get(engine)
    # FSDP2 really sharded the model (not a silent DDP), and the head's unit was found
    assert otr["lora_dtensor_in_training"] == (engine == "fsdp2")
    assert otr["unit_found"] == (engine == "fsdp2")
    if engine == "fsdp2":  # all-gathers of the head's unit (the root) per optimizer step
        # OTR: the forward's gather of each micro-batch only (kept through the loss and the
        # backward), whatever the chunk count; the CE control: forward and backward each
        # gather it (accelerate reshards every unit after forward). Evaluation: the
        # forward's, one per batch, either way.
        accumulation = MICRO_BATCHES_PER_PROCESS // 2
        assert otr["head_unit_gathers_per_step"] == [accumulation] * 2
        assert two["ce"]["head_unit_gathers_per_step"] == [2 * accumulation] * 2
        assert otr["head_unit_gathers_in_eval"] == EVAL_BATCHES_PER_PROCESS
        assert two["ce"]["head_unit_gathers_in_eval"] == EVAL_BATCHES_PER_PROCESS
    if engine == "zero3":  # DeepSpeed's own all-gathers of the head inside each loss
        per_loss = otr["head_gathers_per_loss"]
        # one per loss, for training's micro-batches (2 sequences) and the evaluation's
        # batch (4 sequences: twice the chunks), so not one per chunk
        assert per_loss == [1] * (MICRO_BATCHES_PER_PROCESS + EVAL_BATCHES_PER_PROCESS)


# The one-rank class (test_eval_ranks.py) under the sharded engines: the Trainer methods
# that callbacks call on rank 0 alone and that return under plain CE with the engine
# (engine_worker.NO_COLLECTIVE_CALLS: logging and the dataloader getters; a forward or a
# state-dict gather is the engine's collective for CE as for OTR) return under OTR too,
# after training, and leave the next evaluation's numbers unchanged.
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_one_rank_calls_return_under_sharded_engines(engine, tiny_dir, adapter, tmp_path):
    out = tmp_path / "one-rank.pt"
    args = [engine, tiny_dir / "model", adapter, out, "one-rank"]
    proc = torchrun(WORKER, args, 2, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    saved = torch.load(out, weights_only=False)
    for variant in ("ce", "otr"):
        calls = saved["calls"][variant]
        assert calls and set(calls.values()) == {"returned"}, (variant, calls)
        evals = saved["evals"][variant]
        keys = [k for k in evals["before"] if k == "eval_loss" or "otr/" in k]
        assert "eval_loss" in keys and (variant == "ce" or "eval_otr/ce" in keys), keys
        for key in keys:
            assert evals["after"][key] == pytest.approx(evals["before"][key], rel=1e-6), key
