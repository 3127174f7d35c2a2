"""OTR inside a real HF Trainer: accumulation, evaluation, resume, paths, attachment."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from axolotl_otr.metrics import FIRST_WINDOW_KEYS
from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import OTRTrainerMixin, install_otr
from axolotl_otr.trainer.sampler import OTRSamplerState
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512


def exact(normalization="token", fused=True):
    return OTRSettings(Objective(estimator="exact"), normalization=normalization, fused=fused)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_gives_the_gradient_of_one_big_batch(tiny_dir, tmp_path, normalization, fused):
    examples = make_examples(4, VOCAB)
    settings = exact(normalization, fused)
    big, big_grads, _ = build_trainer(
        tiny_dir / "model",
        tmp_path / "big",
        examples,
        micro_batch=4,
        accumulation=1,
        settings=settings,
    )
    big.train()
    small, small_grads, _ = build_trainer(
        tiny_dir / "model",
        tmp_path / "small",
        examples,
        micro_batch=1,
        accumulation=4,
        settings=settings,
    )
    small.train()
    (a,), (b,) = big_grads.grads, small_grads.grads
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-7, msg=name)


def test_chunked_hidden_path_equals_logits_path_in_the_trainer(tiny_dir, tmp_path):
    examples = make_examples(4, VOCAB)
    runs = {}
    for fused in (True, False):
        trainer, grads, logs = build_trainer(
            tiny_dir / "model",
            tmp_path / str(fused),
            examples,
            micro_batch=2,
            accumulation=2,
            settings=exact(fused=fused),
        )
        assert (trainer.output_layer.weight_and_bias is not None) is fused
        trainer.train()
        runs[fused] = (grads.grads[0], logs.logs[0])
    (g_fused, log_fused), (g_logits, log_logits) = runs[True], runs[False]
    assert log_fused["loss"] == pytest.approx(log_logits["loss"], rel=1e-5)
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_logits[name], rtol=1e-4, atol=1e-7)


def test_training_and_eval_logs_carry_the_otr_metrics(tiny_dir, tmp_path):
    examples = make_examples(8, VOCAB)
    trainer, _, logs = build_trainer(
        tiny_dir / "model",
        tmp_path,
        examples,
        micro_batch=2,
        accumulation=2,
        max_steps=2,
        eval_examples=make_examples(4, VOCAB, seed=1),
        eval_strategy="steps",
        eval_steps=1,
        settings=OTRSettings(Objective()),
    )
    trainer.train()
    train_logs = [log for log in logs.logs if "loss" in log]
    eval_logs = [log for log in logs.logs if "eval_loss" in log]
    assert len(train_logs) == 2 and len(eval_logs) == 2
    for log, prefix in [(train_logs[0], ""), (eval_logs[0], "eval_")]:
        for key in ("otr/ce", "otr/p_target", "otr/hit_rate", "otr/entropy", "otr/ppl"):
            assert math.isfinite(log[prefix + key]), (prefix + key, log)
        assert log[prefix + "otr/ce"] == pytest.approx(math.log(VOCAB), abs=0.5)
    # Evaluation scores every target: its CE is the plain CE of the eval set.
    model = trainer.model.eval()
    batch = {
        k: torch.stack([e[k] for e in make_examples(4, VOCAB, seed=1)])
        for k in ("input_ids", "labels", "attention_mask")
    }
    with torch.no_grad():
        ce = model(**batch).loss.item()
    assert eval_logs[-1]["eval_otr/ce"] == pytest.approx(ce, rel=1e-4)


def test_resume_repeats_the_sampled_draws(tiny_dir, tmp_path):
    examples = make_examples(16, VOCAB)
    common = dict(micro_batch=2, accumulation=1, max_steps=4)
    settings = OTRSettings(Objective(num_samples=4))
    full, _, full_logs = build_trainer(
        tiny_dir / "model",
        tmp_path / "full",
        examples,
        save_strategy="steps",
        save_steps=2,
        settings=settings,
        **common,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["OTRSamplerState"]["args"]["seed"] == settings.seed
    expected = [log["loss"] for log in full_logs.logs if "loss" in log][2:]

    resumed, _, resumed_logs = build_trainer(
        tiny_dir / "model", tmp_path / "resumed", examples, settings=settings, **common
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = [log["loss"] for log in resumed_logs.logs if "loss" in log]
    assert got == pytest.approx(expected, rel=1e-5)
    # the first window's measures are the base model's: a resumed run has none to log
    first_window = FIRST_WINDOW_KEYS["p_target"]
    assert first_window in full_logs.logs[0]
    assert not any(first_window in log for log in resumed_logs.logs)


def test_resume_with_another_seed_draws_other_tokens_and_says_so(tiny_dir, tmp_path, caplog):
    examples = make_examples(16, VOCAB)
    common = dict(micro_batch=2, accumulation=1, max_steps=4)
    full, _, full_logs = build_trainer(
        tiny_dir / "model", tmp_path / "full", examples, save_strategy="steps", save_steps=2,
        settings=OTRSettings(Objective(num_samples=4), seed=1), **common,
    )  # fmt: skip
    full.train()
    expected = [log["loss"] for log in full_logs.logs if "loss" in log][2:]
    other, _, other_logs = build_trainer(
        tiny_dir / "model", tmp_path / "other", examples,
        settings=OTRSettings(Objective(num_samples=4), seed=2), **common,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="axolotl.otr"):
        other.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got = [log["loss"] for log in other_logs.logs if "loss" in log]
    assert got != pytest.approx(expected, rel=1e-5)
    assert "will not repeat" in caplog.text


def test_install_is_idempotent_and_refuses_a_second_loss(tiny_dir, tmp_path):
    trainer, _, _ = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(2, VOCAB), micro_batch=1, accumulation=1
    )
    assert isinstance(trainer, OTRTrainerMixin)
    callbacks = len(trainer.callback_handler.callbacks)
    assert install_otr(trainer, exact()) is trainer
    assert len(trainer.callback_handler.callbacks) == callbacks
    assert sum(isinstance(cb, OTRSamplerState) for cb in trainer.callback_handler.callbacks) == 1
    with pytest.raises(ValueError, match="already trains with"):
        install_otr(trainer, OTRSettings(Objective("sft")))

    def other_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum()

    plain = Trainer(
        model=trainer.model,
        args=TrainingArguments(output_dir=str(tmp_path / "b"), use_cpu=True, report_to=[]),
        compute_loss_func=other_loss,
    )
    with pytest.raises(ValueError, match="already has a compute_loss_func"):
        install_otr(plain, exact())


def test_install_adds_overrides_without_replacing_any_method(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args)
    install_otr(trainer, exact())
    assert type(trainer).__mro__[1:3] == (OTRTrainerMixin, Trainer)
    # Nothing was put on the instance: every method is the class's own.
    for name in ("compute_loss", "log", "get_batch_samples", "_load_rng_state"):
        assert name not in vars(trainer), name
