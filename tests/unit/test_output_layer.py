"""Finding the lm_head as a (weight, bias) pair (``model/output_layer.py``): what is taken,
and the reason given for everything that is not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from axolotl_otr.model.output_layer import resolve_output_layer, unwrap_peft


class Model(nn.Module):
    """A causal-LM shape with a chosen output layer."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)  # a LoRA target other than the head
        self.lm_head = head

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids=None, logits_to_keep=0):
        return self.lm_head(input_ids)


def test_a_linear_head_gives_its_own_parameters():
    head = nn.Linear(4, 9)
    weight, bias = resolve_output_layer(Model(head)).weight_and_bias()
    assert weight is head.weight and bias is head.bias


def test_a_forward_without_logits_to_keep_is_refused():
    class NoKeep(Model):
        def forward(self, input_ids=None):
            return self.lm_head(input_ids)

    layer = resolve_output_layer(NoKeep(nn.Linear(4, 9)))
    assert layer.weight_and_bias is None and "has no logits_to_keep" in layer.reason


def test_an_unknown_head_type_is_refused_by_name():
    layer = resolve_output_layer(Model(nn.Sequential(nn.Linear(4, 9))))
    assert layer.weight_and_bias is None and "Sequential" in layer.reason


@pytest.mark.parametrize(
    ("lora", "reason"),
    [({"lora_dropout": 0.1}, "LoRA dropout"), ({"use_dora": True}, "DoRA")],
)
def test_lora_heads_the_loss_cannot_reproduce_are_refused(lora, reason):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["lm_head"], **lora)
    model = peft.get_peft_model(Model(nn.Linear(4, 9, bias=False)), config)
    assert unwrap_peft(model).lm_head is model.base_model.model.lm_head
    layer = resolve_output_layer(model)
    assert layer.weight_and_bias is None and reason in layer.reason


def test_modules_to_save_follows_the_active_copy():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(Model(nn.Linear(4, 9, bias=False)), config)
    head = model.base_model.model.lm_head
    weight, _ = resolve_output_layer(model).weight_and_bias()
    assert weight is head.modules_to_save["default"].weight
    with model.disable_adapter():
        weight, _ = resolve_output_layer(model).weight_and_bias()
    assert weight is head.original_module.weight
