"""Every family users train: the path the exactness check picks, and that path's exactness.

For each tiny twin (``tests/families.py``: transformers' own config class, tied or untied
as released, the release's logit scale or soft-cap) the check run at attach time
(``exactness.verify_output_layer``) must choose the hidden-state path with the transform
the architecture applies, and that path's loss and every parameter's gradient must equal
the logits path's (the model's own logits, autograd through them). The check itself must
leave the model as it found it, and must refuse what it cannot reproduce.
"""

from __future__ import annotations

import logging

import pytest
import torch

from axolotl_otr.kernels.transform import LogitTransform
from axolotl_otr.loss import weighted_loss
from axolotl_otr.model import exactness
from axolotl_otr.model.capture import capture_final_hidden, find_decoder
from axolotl_otr.model.exactness import candidate_transforms, verify_output_layer
from axolotl_otr.model.output_layer import resolve_output_layer
from axolotl_otr.objective import Objective, OTRSettings
from tests.support.families import FAMILIES, VOCAB, Family
from tests.support.trainer_setup import build_trainer, make_examples

BY_NAME = {family.name: family for family in FAMILIES}


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, labels, mask


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, floor: float = 0.0) -> bool:
    """Equal up to fp32 rounding, measured on the whole tensor (a gradient's entries
    span many orders of magnitude; its norm is what an optimizer step sees). ``floor``:
    an absolute allowance for a tensor whose gradient is a cancellation residue far
    below the model's (Qwen3-Next's ``A_log``, ~1e-8 where others are ~1e-1), whose last
    digits depend on the summation order and the thread count."""
    return (got - want).norm().item() <= rtol * want.norm().item() + max(floor, 1e-12)


def rounding_floor(grads: dict[str, torch.Tensor]) -> float:
    """fp32 rounding of the whole model's gradient: 1e-6 of its total norm."""
    return 1e-6 * torch.stack([g.norm() for g in grads.values()]).norm().item()


def checked(model):
    """The output layer the trainer would use after its check."""
    return verify_output_layer(model, resolve_output_layer(model), find_decoder(model))


def loss_and_grads(model, layer, settings: OTRSettings, fused: bool):
    """(loss, {name: grad}) the way the trainer computes them on each path."""
    model.zero_grad(set_to_none=True)
    ids, labels, mask = batch()
    torch.manual_seed(1)  # the same dropout masks on both paths (Seed-OSS has dropout)
    if fused:
        with capture_final_hidden(find_decoder(model)) as final:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            hidden = final.take()
        loss, _ = weighted_loss(
            hidden, labels, settings, lm_head=layer.weight_and_bias(),
            logit_transform=layer.transform,
        )  # fmt: skip
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss, _ = weighted_loss(logits, labels, settings)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_takes_the_fused_path_and_equals_the_logits_path(family: Family):
    model = family.build()
    layer = checked(model)
    assert layer.weight_and_bias is not None, layer.reason
    assert layer.transform.softcap == family.expected.softcap
    assert layer.transform.scale == pytest.approx(family.expected.scale, rel=1e-12)
    for objective in (Objective(estimator="exact"), Objective("sft")):
        settings = OTRSettings(objective, chunk_size=7)
        fused_loss, fused_grads = loss_and_grads(model, layer, settings, fused=True)
        plain_loss, plain_grads = loss_and_grads(model, layer, settings, fused=False)
        torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
        assert fused_grads.keys() == plain_grads.keys()
        floor = rounding_floor(plain_grads)
        for name, grad in plain_grads.items():
            assert close(fused_grads[name], grad, floor=floor), (family.name, name)


def test_the_twins_logits_reach_past_the_transforms():
    """Soft-capping and scaling change these twins' logits a lot: a fused path that
    ignored the transform could not pass the test above."""
    for name in ("gemma2", "cohere", "granite"):
        family = BY_NAME[name]
        model = family.build()
        ids, _, _ = batch()
        with torch.no_grad(), capture_final_hidden(find_decoder(model)) as final:
            logits = model(input_ids=ids, use_cache=False).logits
            raw = model.get_output_embeddings()(final.take())
        assert (logits - raw).abs().max() > 0.2 * raw.abs().max(), name


def test_candidates_come_from_the_config_both_ways():
    config = BY_NAME["granite"].config()
    got = candidate_transforms(config)
    assert got[0] == LogitTransform()
    assert LogitTransform(scale=8.0) in got and LogitTransform(scale=0.125) in got
    capped = candidate_transforms(BY_NAME["gemma2"].config())
    assert LogitTransform(softcap=30.0) in capped


class _Rescale:
    """A forward hook on the lm_head: a map after it that no config key names."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, _module, _args, output):
        return self.fn(output)


@pytest.mark.parametrize(
    "fn,why",
    [
        (lambda r: 1.5 * r, "a scale no config key names"),
        (lambda r: 30.0 * torch.tanh(r / 30.0), "soft-capping no config key names"),
        (lambda r: r + 0.5, "a shift"),
    ],
)
def test_a_map_the_config_does_not_name_takes_the_logits_path(fn, why, caplog):
    model = BY_NAME["llama"].build()
    model.get_output_embeddings().register_forward_hook(_Rescale(fn))
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        layer = checked(model)
    assert layer.weight_and_bias is None, why
    assert "not T(h W^T + b)" in layer.reason
    assert "exactness check" in caplog.text


def test_the_scaled_rows_see_soft_capping_small_logits_hide():
    """An untrained model's logits are small, where c * tanh(r / c) ~ r: only the
    check's scaled rows tell soft-capping from the identity."""
    torch.manual_seed(0)
    model = BY_NAME["llama"].build()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.05)  # natural |r| about 3
    model.get_output_embeddings().register_forward_hook(
        _Rescale(lambda r: 30.0 * torch.tanh(r / 30.0))
    )
    assert checked(model).weight_and_bias is None


def test_the_check_leaves_the_model_and_the_generators_as_they_were():
    family = BY_NAME["gemma2"]
    model = family.build()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    cpu_state = torch.get_rng_state()
    layer = checked(model)
    assert layer.weight_and_bias is not None
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert all(p.grad is None for p in model.parameters())


def test_lora_adapters_and_a_lora_lm_head_are_checked_with_them():
    peft = pytest.importorskip("peft")
    model = BY_NAME["cohere"].build()
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False,
        lora_dropout=0.0,
    )  # fmt: skip
    model = peft.get_peft_model(model, config)
    layer = checked(model)
    assert layer.weight_and_bias is not None, layer.reason
    assert layer.transform == LogitTransform(scale=0.0625)
    assert len(layer.weight_and_bias()) == 3  # (W, b, (A, B)): the adapter is in the check
    settings = OTRSettings(Objective(estimator="exact"), chunk_size=5)
    fused = loss_and_grads(model, layer, settings, fused=True)
    plain = loss_and_grads(model, layer, settings, fused=False)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for name, grad in plain[1].items():
        assert close(fused[1][name], grad), name


def test_a_failing_check_falls_back_to_the_logits_path(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(exactness, "probe", broken)
    layer = checked(BY_NAME["llama"].build())
    assert layer.weight_and_bias is None
    assert "exactness check failed" in layer.reason and "boom" in layer.reason


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_trainer_attaches_the_measured_path_and_trains_it_like_the_logits_path(name, tmp_path):
    """Through a Trainer and ``install_otr``: attach_otr runs the check, the training step
    uses the fused path with the measured transform, and its gradients are the logits
    path's."""
    family = BY_NAME[name]
    model_dir = tmp_path / "model"
    family.build().save_pretrained(model_dir)
    examples = make_examples(4, VOCAB)
    runs = {}
    for fused in (True, False):
        settings = OTRSettings(Objective(estimator="exact"), fused=fused)
        trainer, grads, _ = build_trainer(
            model_dir, tmp_path / f"out-{fused}", examples, micro_batch=2, accumulation=2,
            settings=settings,
        )  # fmt: skip
        layer = trainer.output_layer
        if fused:
            assert layer.weight_and_bias is not None, layer.reason
            assert layer.transform.softcap == family.expected.softcap
            assert layer.transform.scale == pytest.approx(family.expected.scale)
        else:
            assert layer.weight_and_bias is None
        trainer.train()
        runs[fused] = grads.grads[0]
    assert runs[True].keys() == runs[False].keys()
    for key, grad in runs[False].items():
        assert close(runs[True][key], grad), key


@pytest.mark.parametrize("name", ["gemma2", "cohere"])
def test_calls_that_keep_the_logits_work_on_a_transformed_family(name, tmp_path):
    """Prediction with the logits kept (``prediction_step(prediction_loss_only=False)``,
    ``evaluate`` with ``compute_metrics``, Axolotl's prediction tables) takes the logits
    path, whose logits already carry the model's scale or soft-cap: the loss must not apply
    the measured transform a second time, and must equal the logits-only trainer's."""
    model_dir = tmp_path / "model"
    BY_NAME[name].build().save_pretrained(model_dir)
    examples = make_examples(4, VOCAB)
    losses = {}
    for fused in (True, False):
        trainer, _, _ = build_trainer(
            model_dir, tmp_path / f"out-{fused}", examples, micro_batch=4, accumulation=1,
            settings=OTRSettings(Objective(estimator="exact"), fused=fused),
            eval_examples=examples,
        )  # fmt: skip
        trainer.compute_metrics = lambda _: {"seen": 1.0}  # the loop keeps the logits
        assert (trainer.output_layer.weight_and_bias is not None) == fused
        batch = next(iter(trainer.get_eval_dataloader()))
        loss, logits, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
        assert logits is not None
        metrics = trainer.evaluate()
        assert metrics["eval_seen"] == 1.0 and "eval_otr/ce" in metrics
        losses[fused] = (loss, metrics["eval_loss"], metrics["eval_otr/ce"])
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-6)
    assert losses[True][1:] == pytest.approx(losses[False][1:], rel=1e-5, abs=1e-6)
