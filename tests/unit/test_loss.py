"""The public loss against the reference written in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axolotl_otr import OTRConfigError, otr_loss, otr_loss_from_hidden, stats_to_metrics
from tests.support.reference import per_token_loss, reference_loss, shifted

B, T, V = 3, 9, 17


def batch(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, 4] = -100  # a masked token in the middle
    return logits, labels


def grad_of(loss, tensor):
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 1000])
@pytest.mark.parametrize("kappa,beta", [(1.3, -0.1), (1.0, -0.3), (0.7, 0.5)])
def test_exact_matches_reference(chunk_size, kappa, beta):
    logits, labels = batch()
    loss = otr_loss(
        logits, labels, estimator="exact", temperature=kappa, beta=beta, chunk_size=chunk_size
    )
    ref = reference_loss(logits, labels, estimator="exact", kappa=kappa, beta=beta)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(ref, logits), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
@pytest.mark.parametrize("num_samples", [1, 16, 256])
def test_sampled_matches_reference_given_the_draws(recorded_draws, chunk_size, num_samples):
    logits, labels = batch(1)
    gen = torch.Generator().manual_seed(3)
    loss = otr_loss(logits, labels, num_samples=num_samples, generator=gen, chunk_size=chunk_size)
    draws = torch.cat(recorded_draws)
    z, y = shifted(logits, labels)
    assert draws.shape == (len(y), num_samples)
    ref = per_token_loss(z, y, estimator="sampled", draws=draws).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(ref, logits), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sft_mix", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("kappa", [1.0, 1.3])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_sft_mix_matches_reference_for_both_estimators(recorded_draws, sft_mix, kappa, chunk_size):
    logits, labels = batch(4)
    common = dict(temperature=kappa, beta=-0.2, sft_mix=sft_mix, chunk_size=chunk_size)
    loss = otr_loss(logits, labels, estimator="exact", **common)
    ref = reference_loss(logits, labels, estimator="exact", kappa=kappa, beta=-0.2, sft_mix=sft_mix)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(ref, logits), rtol=1e-4, atol=1e-6)

    gen = torch.Generator().manual_seed(5)
    loss = otr_loss(logits, labels, num_samples=8, generator=gen, **common)
    z, y = shifted(logits, labels)
    draws = torch.cat(recorded_draws)
    ref = per_token_loss(
        z, y, estimator="sampled", kappa=kappa, beta=-0.2, draws=draws, sft_mix=sft_mix
    ).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(ref, logits), rtol=1e-4, atol=1e-6)


def test_sft_mix_one_is_cross_entropy():
    logits, labels = batch(6)
    loss = otr_loss(logits, labels, sft_mix=1.0)
    ce = otr_loss(logits, labels, objective="sft")
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(ce, logits))


def test_masked_positions_get_no_gradient():
    logits, labels = batch()
    for estimator in ("exact", "sampled"):
        grad = grad_of(otr_loss(logits, labels, estimator=estimator), logits)
        next_label = torch.full_like(labels, -100)
        next_label[:, :-1] = labels[:, 1:]
        assert grad[next_label == -100].abs().max() == 0
        assert grad[next_label != -100].abs().sum(-1).min() > 0


def test_sft_is_cross_entropy_and_dft_matches_reference():
    logits, labels = batch(2)
    sft = otr_loss(logits, labels, objective="sft")
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(sft, ce)
    torch.testing.assert_close(grad_of(sft, logits), grad_of(ce, logits))
    dft = otr_loss(logits, labels, objective="dft")
    ref = reference_loss(logits, labels, objective="dft")
    torch.testing.assert_close(dft, ref)
    torch.testing.assert_close(grad_of(dft, logits), grad_of(ref, logits))


def test_exact_with_kappa_one_is_scaled_dft_gradient():
    logits, labels = batch(4)
    beta = -0.2
    exact = otr_loss(logits, labels, estimator="exact", temperature=1.0, beta=beta)
    dft = otr_loss(logits, labels, objective="dft")
    dft_grad = grad_of(dft, logits)
    torch.testing.assert_close(grad_of(exact, logits), (1 - beta) * dft_grad)
    # ...and with kappa != 1 the beta term does not vanish.
    sharp = otr_loss(logits, labels, estimator="exact", temperature=1.3, beta=beta)
    assert not torch.allclose(grad_of(sharp, logits), (1 - beta) * dft_grad)


def test_exact_is_the_mean_of_sampled_draws():
    logits, labels = batch(5)
    exact = grad_of(otr_loss(logits, labels, estimator="exact"), logits)
    gen = torch.Generator().manual_seed(0)
    grads = torch.stack(
        [
            grad_of(otr_loss(logits, labels, num_samples=64, generator=gen), logits)
            for _ in range(300)
        ]
    )
    mean, stderr = grads.mean(0), grads.std(0) / grads.shape[0] ** 0.5
    z = (mean - exact).abs() / (stderr + 1e-9)
    # Each entry is within 5 standard errors (and the estimate is not degenerate).
    assert (z[stderr > 0] < 5).all(), float(z.max())
    assert stderr.max() > 0
    # A wrong expectation (e.g. forgetting the beta term) is far outside that band.
    dft = grad_of(otr_loss(logits, labels, objective="dft"), logits)
    assert ((mean - 1.1 * dft).abs() / (stderr + 1e-9)).max() > 5


def test_same_seed_same_samples_and_different_seed_differs():
    logits, labels = batch(6)

    def run(seed):
        return otr_loss(
            logits, labels, num_samples=8, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_num_items_in_batch_divides_the_summed_loss():
    logits, labels = batch(7)
    count = int((labels[:, 1:] != -100).sum())
    local = otr_loss(logits, labels, estimator="exact")
    global_ = otr_loss(logits, labels, estimator="exact", num_items_in_batch=4 * count)
    torch.testing.assert_close(global_, local / 4)
    as_tensor = otr_loss(
        logits, labels, estimator="exact", num_items_in_batch=torch.tensor(4 * count)
    )
    torch.testing.assert_close(as_tensor, global_)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_micro_batches_with_global_count_equal_one_big_batch(normalization):
    logits, labels = batch(8)
    full = otr_loss(logits, labels, estimator="exact", normalization=normalization)
    units = int((labels[:, 1:] != -100).sum()) if normalization == "token" else B
    parts = [
        otr_loss(
            logits[i : i + 1],
            labels[i : i + 1],
            estimator="exact",
            normalization=normalization,
            num_items_in_batch=units,
        )
        for i in range(B)
    ]
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(grad_of(sum(parts), logits), grad_of(full, logits))


def test_sequence_normalization_is_mean_of_sequence_means():
    logits, labels = batch(9)
    loss = otr_loss(logits, labels, estimator="exact", normalization="sequence")
    means = [
        reference_loss(logits[i : i + 1], labels[i : i + 1], estimator="exact") for i in range(B)
    ]
    torch.testing.assert_close(loss, sum(means) / B)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(sum(means) / B, logits))


def test_packed_row_scores_no_target_across_a_boundary():
    logits, labels = batch(10)
    labels = labels.clone()
    labels[0] = torch.randint(0, V, (T,))  # every token is a target, boundaries included
    packed_logits = logits[0:1]
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    packed = otr_loss(packed_logits, labels[0:1], estimator="exact", position_ids=position_ids)
    segments = [(0, 4), (4, 7), (7, 9)]
    total = sum(
        reference_loss(packed_logits[:, a:b], labels[0:1, a:b], num_items=1, estimator="exact")
        for a, b in segments
    )
    count = sum(b - a - 1 for a, b in segments)
    torch.testing.assert_close(packed, total / count)
    torch.testing.assert_close(
        grad_of(packed, logits), grad_of(total / count, logits), rtol=1e-4, atol=1e-6
    )
    # Per-sequence normalization sees three sequences in the packed row.
    per_seq = otr_loss(
        packed_logits,
        labels[0:1],
        estimator="exact",
        normalization="sequence",
        position_ids=position_ids,
    )
    means = [
        reference_loss(packed_logits[:, a:b], labels[0:1, a:b], estimator="exact")
        for a, b in segments
    ]
    torch.testing.assert_close(per_seq, sum(means) / 3)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    logits, labels = batch()
    labels = torch.full_like(labels, -100)
    loss, stats = otr_loss(logits, labels, return_metrics=True)
    assert loss.item() == 0.0
    assert grad_of(loss, logits).abs().max() == 0
    assert stats_to_metrics(stats)["tokens"] == 0


def test_nan_logits_raise_a_clear_error():
    logits, labels = batch()
    with torch.no_grad():
        logits[1, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        otr_loss(logits, labels)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(num_samples=0), "otr_num_samples"),
        (dict(num_samples=2.5), "otr_num_samples"),
        (dict(temperature=0.0), "otr_temperature"),
        (dict(temperature=float("inf")), "otr_temperature"),
        (dict(beta=1.0), "otr_beta"),
        (dict(beta=-1.5), "otr_beta"),
        (dict(estimator="greedy"), "otr_estimator"),
        (dict(normalization="batch"), "otr_normalization"),
        (dict(objective="ppo"), "otr_objective"),
        (dict(sft_mix=1.2), "otr_sft_mix"),
        (dict(sft_mix=0.5, objective="dft"), "otr_sft_mix"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    logits, labels = batch()
    with pytest.raises(OTRConfigError, match=key):
        otr_loss(logits, labels, **kwargs)


def test_label_outside_vocabulary_is_refused():
    logits, labels = batch()
    labels = labels.clone()
    labels[2, 7] = V + 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        otr_loss(logits, labels)
    labels[2, 7] = -5
    with pytest.raises(ValueError, match="negative ids"):
        otr_loss(logits, labels)


def test_metrics_are_the_plain_statistics_of_the_batch():
    logits, labels = batch(11)
    _, stats = otr_loss(logits, labels, estimator="exact", return_metrics=True)
    metrics = stats_to_metrics(stats)
    z, y = shifted(logits.detach(), labels)
    logp = F.log_softmax(z, -1)
    assert metrics["tokens"] == len(y)
    assert metrics["ce"] == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-5)
    assert metrics["p_target"] == pytest.approx(
        logp.gather(1, y[:, None]).exp().mean().item(), rel=1e-5
    )
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert metrics["entropy"] == pytest.approx(entropy, rel=1e-5)
    hit = F.softmax(z / 1.3, -1).gather(1, y[:, None]).mean().item()  # exact: expected hits
    assert metrics["hit_rate"] == pytest.approx(hit, rel=1e-5)


def test_sampled_hit_rate_is_the_share_of_draws_equal_to_the_target(recorded_draws):
    logits, labels = batch(12)
    _, stats = otr_loss(logits, labels, num_samples=32, return_metrics=True)
    _, y = shifted(logits, labels)
    draws = torch.cat(recorded_draws)
    expected = (draws == y[:, None]).float().mean().item()
    assert stats_to_metrics(stats)["hit_rate"] == pytest.approx(expected, rel=1e-6)


def test_bf16_logits_are_scored_in_fp32():
    logits, labels = batch(13)
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    loss = otr_loss(low, labels, estimator="exact")
    assert loss.dtype == torch.float32
    ref = reference_loss(low.detach().float().requires_grad_(), labels, estimator="exact")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grad = grad_of(loss, low)
    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_hidden_state_path_equals_logits_path(estimator):
    gen = torch.Generator().manual_seed(14)
    hidden = torch.randn(B, T, 6, generator=gen, requires_grad=True)
    weight = torch.randn(V, 6, generator=gen, requires_grad=True)
    _, labels = batch(14)
    a = otr_loss_from_hidden(
        hidden,
        weight,
        labels,
        estimator=estimator,
        chunk_size=4,
        generator=torch.Generator().manual_seed(1),
    )
    b = otr_loss(
        hidden @ weight.T,
        labels,
        estimator=estimator,
        chunk_size=4,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(a, b)
    for ga, gb in zip(
        torch.autograd.grad(a, (hidden, weight)),
        torch.autograd.grad(b, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_mismatched_shapes_are_refused_with_a_clear_error():
    logits, labels = batch()
    with pytest.raises(ValueError, match="do not match"):
        otr_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="do not match"):
        otr_loss_from_hidden(torch.randn(B, T - 1, 4), torch.randn(V, 4), labels)


def test_broadcast_position_ids_apply_to_every_row():
    # Collators and models often pass one [1, seq] row of positions for the whole batch.
    logits, labels = batch(15)
    shared = torch.arange(T).unsqueeze(0)  # [1, T]: no packing boundary
    loss = otr_loss(logits, labels, estimator="exact", position_ids=shared)
    torch.testing.assert_close(loss, reference_loss(logits, labels, estimator="exact"))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    broadcast = otr_loss(logits, labels, estimator="exact", position_ids=packed)
    full = otr_loss(logits, labels, estimator="exact", position_ids=packed.expand(B, T))
    torch.testing.assert_close(broadcast, full)
    with pytest.raises(ValueError, match="position_ids"):
        otr_loss(logits, labels, position_ids=torch.arange(T - 1).unsqueeze(0))


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_hidden_state_path_with_an_lm_head_bias_matches_the_reference(recorded_draws, estimator):
    gen = torch.Generator().manual_seed(16)
    hidden = torch.randn(B, T, 6, generator=gen, requires_grad=True)
    weight = torch.randn(V, 6, generator=gen, requires_grad=True)
    bias = torch.randn(V, generator=gen, requires_grad=True)
    _, labels = batch(16)
    loss = otr_loss_from_hidden(
        hidden,
        weight,
        labels,
        lm_head_bias=bias,
        estimator=estimator,
        num_samples=8,
        chunk_size=4,
        generator=torch.Generator().manual_seed(2),
    )
    logits = hidden @ weight.T + bias
    z, y = shifted(logits, labels)
    draws = torch.cat(recorded_draws) if estimator == "sampled" else None
    ref = per_token_loss(z, y, estimator=estimator, draws=draws).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(ref, (hidden, weight, bias))
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["sft", "dft", "otr"])
@pytest.mark.parametrize("estimator", ["sampled", "exact"])
@pytest.mark.parametrize("from_hidden", [False, True])
def test_argmax_share_is_the_share_of_targets_the_model_ranks_first(
    objective, estimator, from_hidden
):
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(B, T, 8, generator=gen)
    weight = torch.randn(V, 8, generator=gen)
    logits = hidden @ weight.T
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100
    # every other target is the model's argmax at its (shifted) position
    labels[:, 1::2] = logits[:, :-1].argmax(-1)[:, 0::2]
    kwargs = dict(objective=objective, estimator=estimator, chunk_size=4, return_metrics=True)
    if from_hidden:
        _, stats = otr_loss_from_hidden(hidden, weight, labels, **kwargs)
    else:
        _, stats = otr_loss(logits, labels, **kwargs)
    z, y = shifted(logits, labels)
    expected = (z.argmax(-1) == y).double().mean().item()
    assert 0.4 < expected < 1.0
    assert stats_to_metrics(stats)["argmax_share"] == pytest.approx(expected, rel=1e-6)
