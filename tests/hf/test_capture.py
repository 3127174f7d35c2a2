"""The hidden-state path hands the loss one [tokens, hidden] tensor, in the model's dtype.

Asking the model for ``output_hidden_states`` would return every layer's hidden state,
and under ``bf16`` accelerate's ``convert_outputs_to_fp32`` copies each of them to fp32
before the loss function sees them. The trainer instead takes the final normed hidden
state from the decoder's output, so the loss sees exactly one such tensor, and the
gradients equal the logits path's for the lm_head layouts users train with.
"""

from __future__ import annotations

import pytest
import torch

import axolotl_otr.trainer.mixin as otr_trainer
from axolotl_otr.objective import Objective, OTRSettings
from tests.support.trainer_setup import SEQ_LEN, build_trainer, make_examples

VOCAB = 512


def _tensors(value):
    """Every tensor reachable from a model output (ModelOutput, tuples, lists)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def test_bf16_trainer_hands_the_loss_one_hidden_state_in_bf16(tiny_dir, tmp_path, monkeypatch):
    trainer, grads, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(4, VOCAB), micro_batch=2, accumulation=1,
        model_kwargs={"torch_dtype": torch.bfloat16}, bf16=True,
        settings=OTRSettings(Objective(estimator="exact")),
        eval_examples=make_examples(2, VOCAB, seed=1),
    )  # fmt: skip
    assert trainer.output_layer.weight_and_bias is not None
    hidden_size = trainer.model.config.hidden_size
    shape = (2, SEQ_LEN, hidden_size)
    calls = []
    weighted = otr_trainer.weighted_loss

    def spy_weighted(activations, *args, **kwargs):
        calls[-1]["activations"] = activations
        calls[-1]["lm_head"] = kwargs["lm_head"]
        loss, stats = weighted(activations, *args, **kwargs)
        calls[-1]["loss_has_graph"] = loss.requires_grad
        return loss, stats

    monkeypatch.setattr(otr_trainer, "weighted_loss", spy_weighted)
    loss_func = trainer.compute_loss_func

    def tally(outputs, labels, num_items_in_batch=None):
        calls.append(
            {
                "outputs": [t for t in _tensors(outputs) if tuple(t.shape) == shape],
                "logits": tuple(outputs.logits.shape),
            }
        )
        return loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss_func = tally
    trainer.train()
    metrics = trainer.evaluate()
    assert len(calls) == 2  # one training step, one evaluation batch
    for call in calls:
        seen = {id(t): t for t in [*call["outputs"], call["activations"]]}
        assert len(seen) == 1, [(tuple(t.shape), t.dtype) for t in seen.values()]
        # The hidden state the loss uses is the model's bf16 tensor, not an fp32 copy.
        assert call["activations"].dtype == torch.bfloat16
        assert tuple(call["activations"].shape) == shape
        # The model's own lm_head ran on the last position only.
        assert call["logits"] == (2, 1, VOCAB)
    train, evaluation = calls
    assert train["lm_head"][0].requires_grad and train["loss_has_graph"]
    # Evaluation (no_grad) builds no graph, so no lm_head gradient is computed (the
    # fp32 [V, D] accumulator this would cost is tested in tests/unit/test_weight_grad.py).
    assert not evaluation["loss_has_graph"]
    assert grads.grads and all(torch.isfinite(g).all() for g in grads.grads[0].values())
    assert metrics["eval_otr/ce"] > 0


def _lora(modules_to_save=None):
    def wrap(model):
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            modules_to_save=modules_to_save, init_lora_weights=False,
        )  # fmt: skip
        return peft.get_peft_model(model, config)

    return wrap


def _lora_on_lm_head(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
        init_lora_weights=False,
    )  # fmt: skip
    return peft.get_peft_model(model, config)


LAYOUTS = {
    "plain": ({}, None, {}),
    "tied": ({"tie_word_embeddings": True}, None, {}),
    "lora": ({}, _lora(), {}),
    "lora_modules_to_save": ({}, _lora(["lm_head"]), {}),
    "lora_on_lm_head": ({}, _lora_on_lm_head, {}),
    "gradient_checkpointing": ({}, None, {"gradient_checkpointing": True}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hidden_path_equals_logits_path_for_each_lm_head_layout(tiny_dir, tmp_path, layout):
    model_kwargs, wrap, args = LAYOUTS[layout]
    examples = make_examples(4, VOCAB)
    eval_examples = make_examples(2, VOCAB, seed=1)
    runs = {}
    for fused in (True, False):
        trainer, grads, logs = build_trainer(
            tiny_dir / "model", tmp_path / str(fused), examples, micro_batch=2, accumulation=2,
            settings=OTRSettings(Objective(estimator="exact"), fused=fused),
            model_kwargs=model_kwargs, wrap_model=wrap, eval_examples=eval_examples, **args,
        )  # fmt: skip
        assert (trainer.output_layer.weight_and_bias is not None) is fused, layout
        trainer.train()
        metrics = trainer.evaluate()
        runs[fused] = (grads.grads[0], logs.logs[0], metrics)
    (g_hidden, log_hidden, eval_hidden), (g_logits, log_logits, eval_logits) = (
        runs[True],
        runs[False],
    )
    assert log_hidden["loss"] == pytest.approx(log_logits["loss"], rel=1e-5)
    for key in ("eval_loss", "eval_otr/ce", "eval_otr/p_target", "eval_otr/entropy"):
        assert eval_hidden[key] == pytest.approx(eval_logits[key], rel=1e-5), key
    assert g_hidden.keys() == g_logits.keys() and len(g_hidden) > 0
    for name in g_hidden:
        torch.testing.assert_close(g_hidden[name], g_logits[name], rtol=1e-4, atol=1e-7, msg=name)


def test_prediction_keeps_the_full_logits(tiny_dir, tmp_path):
    eval_examples = make_examples(2, VOCAB, seed=1)
    trainer, _, _ = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(2, VOCAB), micro_batch=2, accumulation=1,
        settings=OTRSettings(Objective(estimator="exact")),
    )  # fmt: skip
    assert trainer.output_layer.weight_and_bias is not None
    output = trainer.predict(eval_examples)
    assert output.predictions.shape == (2, SEQ_LEN, VOCAB)
    assert output.metrics["test_otr/ce"] > 0
    # The chunked evaluation (no logits kept) scores the same targets the same way.
    metrics = trainer.evaluate(eval_examples)
    assert metrics["eval_otr/ce"] == pytest.approx(output.metrics["test_otr/ce"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(output.metrics["test_loss"], rel=1e-5)


def test_the_capture_records_for_one_call_and_catches_a_second_forward(tiny_dir):
    from transformers import AutoModelForCausalLM

    from axolotl_otr.model.capture import capture_final_hidden, find_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    decoder = find_decoder(model)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad(), capture_final_hidden(decoder) as captured:
        own = model(input_ids=ids, output_hidden_states=True)
        hidden = captured.take()
    torch.testing.assert_close(hidden, own.hidden_states[-1])
    with pytest.raises(RuntimeError, match="once"):
        captured.take()  # handed over once, then released
    with torch.no_grad(), capture_final_hidden(decoder) as later:
        pass
    with torch.no_grad():
        model(input_ids=ids)  # after the block: the hook is inert, nothing is recorded
    with pytest.raises(RuntimeError, match="saw 0"):
        later.take()
    with torch.no_grad(), capture_final_hidden(decoder) as twice:
        model(input_ids=ids)
        model(input_ids=ids)
        with pytest.raises(RuntimeError, match="saw 2"):
            twice.take()
