"""The trainer hook inside a real HF Trainer: accumulation, evaluation, resume, paths."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_setup import build_trainer, make_examples

from axolotl_otr.objective import Objective
from axolotl_otr.trainer_hook import SAMPLER_STATE_FILE, OTRSettings, install_otr

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
        assert (trainer._otr_hook.output_layer.weight_and_bias is not None) is fused
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


def test_resume_restores_the_sampler(tiny_dir, tmp_path):
    examples = make_examples(16, VOCAB)
    common = dict(
        micro_batch=2, accumulation=1, max_steps=4, settings=OTRSettings(Objective(num_samples=4))
    )
    full, _, full_logs = build_trainer(
        tiny_dir / "model",
        tmp_path / "full",
        examples,
        save_strategy="steps",
        save_steps=2,
        **common,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / SAMPLER_STATE_FILE.format(rank=0)).is_file()
    expected = [log["loss"] for log in full_logs.logs if "loss" in log][2:]

    resumed, _, resumed_logs = build_trainer(
        tiny_dir / "model", tmp_path / "resumed", examples, **common
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = [log["loss"] for log in resumed_logs.logs if "loss" in log]
    assert got == pytest.approx(expected, rel=1e-5)

    # Without the saved sampler state the draws restart from the seed: the losses differ.
    (checkpoint / SAMPLER_STATE_FILE.format(rank=0)).unlink()
    restarted, _, restarted_logs = build_trainer(
        tiny_dir / "model", tmp_path / "restarted", examples, **common
    )
    restarted.train(resume_from_checkpoint=str(checkpoint))
    other = [log["loss"] for log in restarted_logs.logs if "loss" in log]
    assert other != pytest.approx(expected, rel=1e-5)


def test_install_is_idempotent_and_refuses_a_second_loss(tiny_dir, tmp_path):
    trainer, _, _ = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(2, VOCAB), micro_batch=1, accumulation=1
    )
    hook = trainer._otr_hook
    assert install_otr(trainer, exact()) is hook
    trainer2, _, _ = build_trainer(
        tiny_dir / "model", tmp_path / "b", make_examples(2, VOCAB), micro_batch=1, accumulation=1
    )
    trainer2._otr_hook = None
    with pytest.raises(ValueError, match="already has a compute_loss_func"):
        install_otr(trainer2, exact())
