"""Mixture-of-experts models: the router's load-balancing loss stays in the training loss.

With ``output_router_logits`` the model adds ``router_aux_loss_coef * aux_loss`` to its
own loss; OTR replaces the token loss only, so ``otr_objective: sft`` must give exactly
the model's own loss, on the hidden-state path and on the logits path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import install_otr

VOCAB = 64


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).float()


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("fused", [True, False])
def test_sft_objective_keeps_the_router_loss_of_the_model(tmp_path, fused):
    model = tiny_mixtral()
    inputs = batch()
    with torch.no_grad():
        own = model(**inputs)
    assert own.aux_loss is not None and own.aux_loss > 0
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args)
    hook = install_otr(trainer, OTRSettings(Objective("sft"), fused=fused))
    assert (hook.output_layer.weight_and_bias is not None) is fused
    model.train()
    items = int((inputs["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
    torch.testing.assert_close(loss, own.loss, rtol=1e-5, atol=1e-6)
    # The difference to the cross-entropy alone is the weighted router loss.
    assert (loss - 0.5 * own.aux_loss).item() == pytest.approx(
        own.loss.item() - 0.5 * own.aux_loss.item(), rel=1e-5
    )
