"""The path the loss takes (``model/loss_path.py``), decided at attach for a trainer-like
object: a tiny Llama, no Trainer, no processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from axolotl_otr.model.loss_path import choose_loss_path, fused_everywhere


class Accelerator:
    """As many processes as ``answers``; the gather returns every process's answer."""

    def __init__(self, *others: int) -> None:
        self.others = others
        self.num_processes = 1 + len(others)
        self.device = torch.device("cpu")
        self.gathered = 0

    def gather(self, here: torch.Tensor) -> torch.Tensor:
        self.gathered += 1
        return torch.cat([here, torch.tensor(self.others, dtype=here.dtype)])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def trainer(model=None, n_gpu: int = 0, accelerator=None, **engine) -> SimpleNamespace:
    return SimpleNamespace(
        model=model if model is not None else tiny_llama(),
        args=SimpleNamespace(n_gpu=n_gpu),
        accelerator=accelerator or Accelerator(),
        **engine,
    )


def test_a_plain_model_takes_the_measured_fused_path():
    path = choose_loss_path(trainer(), fused=True)
    assert path.fused and path.decoder is not None
    assert path.describe().startswith("chunked from hidden states")


@pytest.mark.parametrize(
    ("fused", "setup", "reason"),
    [
        (False, {}, "otr_fused is false"),
        (True, {"n_gpu": 2}, "DataParallel replicates the model"),
        (True, {"is_fsdp_enabled": True}, "FSDP (version 1) shards the lm_head"),
    ],
)
def test_the_logits_path_says_why(fused, setup, reason):
    path = choose_loss_path(trainer(**setup), fused=fused)
    assert not path.fused
    assert reason in path.describe() and path.describe().startswith("from full logits")


def test_every_process_follows_one_that_had_to_take_the_logits_path():
    accelerator = Accelerator(0)  # the other process's check failed
    path = choose_loss_path(trainer(accelerator=accelerator), fused=True)
    assert not path.fused and "another process" in path.layer.reason
    assert accelerator.gathered == 1


@pytest.mark.parametrize("fused", [True, False])
def test_the_agreement_is_one_gather_on_every_process_whatever_its_answer(fused):
    accelerator = Accelerator(1)
    choose_loss_path(trainer(accelerator=accelerator), fused=fused)
    assert accelerator.gathered == 1  # a process on the logits path still meets the others


def test_one_process_needs_no_gather():
    accelerator = Accelerator()
    assert fused_everywhere(accelerator, True) and not fused_everywhere(accelerator, False)
    assert accelerator.gathered == 0


def engine_state(**plugins) -> SimpleNamespace:
    """accelerate's state as the Trainer leaves it under FSDP2 or DeepSpeed ZeRO-3."""
    fsdp = plugins.get("fsdp_version")
    zero = plugins.get("zero_stage")
    return SimpleNamespace(
        fsdp_plugin=None if fsdp is None else SimpleNamespace(fsdp_version=fsdp),
        deepspeed_plugin=None if zero is None else SimpleNamespace(zero_stage=zero),
    )


@pytest.mark.parametrize(
    ("flags", "plugins", "engine"),
    [
        ({"is_fsdp_enabled": True}, {"fsdp_version": 2}, "FSDP2"),
        ({"is_deepspeed_enabled": True}, {"zero_stage": 3}, "DeepSpeed ZeRO-3"),
    ],
)
def test_a_sharding_engine_takes_the_fused_path_for_a_frozen_head_only(flags, plugins, engine):
    accelerator = Accelerator()
    accelerator.state = engine_state(**plugins)
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    path = choose_loss_path(trainer(model, accelerator=accelerator, **flags), fused=True)
    assert path.fused and path.layer.sharded is not None
    assert path.layer.sharded.engine == engine
    model.lm_head.weight.requires_grad_(True)  # a full fine-tune trains the head
    path = choose_loss_path(trainer(model, accelerator=accelerator, **flags), fused=True)
    assert not path.fused and f"{engine} shards a trainable lm_head" in path.layer.reason


def test_zero_2_keeps_the_head_whole():
    accelerator = Accelerator()
    accelerator.state = engine_state(zero_stage=2)
    path = choose_loss_path(trainer(accelerator=accelerator, is_deepspeed_enabled=True), fused=True)
    assert path.fused and path.layer.sharded is None
