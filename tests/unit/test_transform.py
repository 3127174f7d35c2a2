"""Scaled and soft-capped logits in the chunked loss, against autograd on the model's logits.

The hidden-state path computes ``z = T(h W^T)`` chunk by chunk, with the gradient through
``T`` in closed form (``transform.py``). The reference computes the same logits as a
model does (``h @ W.T``, then ``* s`` or ``c * tanh(. / c)``, in the model's dtype), the
loss from ``tests/reference.py`` and every gradient by autograd. Logits reach several
times the cap, so the transform changes the loss, the gradient, the sampler and the
metrics visibly.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.kernels.transform import LogitTransform
from axolotl_otr.metrics import stats_to_metrics
from tests.support.reference import per_token_loss, reference_loss, shifted

B, T, H, V = 2, 13, 8, 37
TRANSFORMS = [
    LogitTransform(),
    LogitTransform(scale=0.0625),  # Cohere
    LogitTransform(scale=1 / 8),  # Granite 3.x (logits / 8)
    LogitTransform(softcap=30.0),  # Gemma 2
    LogitTransform(scale=2.0, softcap=5.0),  # both, cap hard hit
]
OBJECTIVES = [
    dict(objective="sft"),
    dict(objective="dft"),
    dict(objective="otr", estimator="exact"),
    dict(objective="otr", estimator="exact", temperature=1.0),
    dict(objective="otr", estimator="sampled", num_samples=16),
    dict(objective="otr", estimator="exact", sft_mix=0.3),
]
# fp32: (loss, gradient) relative tolerances against autograd. 16-bit: the model's own
# autograd is itself off the exact (float64) values by rounding; the chunked loss must be
# at most ``SLACK`` times as far off, or within ``FLOOR`` of them.
FP32_TOLERANCE = (1e-5, 1e-4)
SLACK = 1.5
FLOOR = {torch.bfloat16: 4e-3, torch.float16: 3e-3}


def data(seed: int, dtype: torch.dtype, spread: float = 80.0):
    """Hidden states and an lm_head whose outputs reach about ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    weight *= spread / (hidden @ weight.T).abs().max()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100
    labels[1, 8] = -100
    return (
        hidden.to(dtype).requires_grad_(),
        weight.to(dtype).requires_grad_(),
        labels,
    )


def model_logits(hidden, weight, transform: LogitTransform):
    """The logits as a model computes them: the lm_head, then the transform, in dtype."""
    logits = hidden @ weight.T
    if transform.scale != 1.0:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return logits


def reference(hidden, weight, labels, transform, kwargs, draws):
    logits = model_logits(hidden, weight, transform)
    if kwargs.get("estimator") == "sampled":
        z, y = shifted(logits, labels)
        keys = ("objective", "estimator", "beta")
        extra = {k: kwargs[k] for k in keys if k in kwargs}
        return per_token_loss(z, y, draws=torch.cat(draws), **extra).mean()
    return reference_loss(logits, labels, **kwargs)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", OBJECTIVES, ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.describe())
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_transformed_loss_and_gradients_equal_autograd(
    transform, kwargs, dtype, chunk_size, recorded_draws
):
    hidden, weight, labels = data(0, dtype)
    gen = torch.Generator().manual_seed(1)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_samples", "temperature")}
    if "temperature" in kwargs:
        ref_kwargs["kappa"] = kwargs["temperature"]
    loss = otr_loss_from_hidden(
        hidden, weight, labels, logit_scale=transform.scale, logit_softcap=transform.softcap,
        chunk_size=chunk_size, generator=gen, **kwargs,
    )  # fmt: skip
    ref = reference(hidden, weight, labels, transform, ref_kwargs, recorded_draws)
    got = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    want = (ref, *torch.autograd.grad(ref, (hidden, weight)))
    assert [g.dtype for g in got[1:]] == [dtype, dtype]
    if dtype == torch.float32:
        loss_tol, grad_tol = FP32_TOLERANCE
        for g, w, tol in zip(got, want, (loss_tol, grad_tol, grad_tol), strict=True):
            assert relative(g, w) <= tol, (relative(g, w), tol)
        return
    # the same inputs (their 16-bit values) in float64: the exact loss and gradients
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    exact = reference(h64, w64, labels, transform, ref_kwargs, recorded_draws)
    exact = (exact, *torch.autograd.grad(exact, (h64, w64)))
    for g, w, x in zip(got, want, exact, strict=True):
        assert relative(g, x) <= max(SLACK * relative(w, x), FLOOR[dtype]), (
            relative(g, x), relative(w, x),
        )  # fmt: skip


def test_the_transform_matters_here():
    """The grid's logits are far enough past the caps that ignoring the transform would
    fail it: the plain loss differs from the capped one by much more than the tolerance."""
    hidden, weight, labels = data(0, torch.float32)
    plain = otr_loss_from_hidden(hidden, weight, labels, estimator="exact")
    for transform in TRANSFORMS[1:]:
        capped = otr_loss_from_hidden(
            hidden, weight, labels, estimator="exact",
            logit_scale=transform.scale, logit_softcap=transform.softcap,
        )  # fmt: skip
        assert relative(capped, plain) > 0.05


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=lambda t: t.describe())
def test_sampler_draws_from_the_tempered_transformed_policy(transform, recorded_draws):
    """Same seed, same draws as the logits path on the model's own (transformed) logits:
    the K tokens come from softmax(T(r) / kappa), not from softmax(r / kappa)."""
    hidden, weight, labels = data(3, torch.float32)
    fused = otr_loss_from_hidden(
        hidden, weight, labels, logit_scale=transform.scale, logit_softcap=transform.softcap,
        num_samples=64, chunk_size=5, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    fused_draws = torch.cat(recorded_draws)
    recorded_draws.clear()
    logits = model_logits(hidden, weight, transform)
    plain = otr_loss(
        logits, labels, num_samples=64, chunk_size=5, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(fused_draws, torch.cat(recorded_draws))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    recorded_draws.clear()
    otr_loss(hidden @ weight.T, labels, num_samples=64, chunk_size=5,
             generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert not torch.equal(fused_draws, torch.cat(recorded_draws))  # untransformed differ


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=lambda t: t.describe())
def test_metrics_are_those_of_the_transformed_logits(transform):
    hidden, weight, labels = data(4, torch.float32)
    _, stats = otr_loss_from_hidden(
        hidden, weight, labels, logit_scale=transform.scale, logit_softcap=transform.softcap,
        estimator="exact", chunk_size=4, return_metrics=True,
    )  # fmt: skip
    got = stats_to_metrics(stats)
    z, y = shifted(model_logits(hidden, weight, transform).detach(), labels)
    logp = torch.log_softmax(z, -1)
    assert got["ce"] == pytest.approx(-logp.gather(1, y[:, None]).mean().item(), rel=1e-5)
    assert got["p_target"] == pytest.approx(
        logp.gather(1, y[:, None]).exp().mean().item(), rel=1e-5
    )
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert got["entropy"] == pytest.approx(entropy, rel=1e-5)
    hit = torch.softmax(z / 1.3, -1).gather(1, y[:, None]).mean().item()
    assert got["hit_rate"] == pytest.approx(hit, rel=1e-5)
    argmax = (z.gather(1, y[:, None])[:, 0] >= z.max(-1).values).float().mean().item()
    assert got["argmax_share"] == pytest.approx(argmax, abs=1e-6)


def test_a_transform_is_refused_on_the_logits_path():
    from axolotl_otr.loss import weighted_loss
    from axolotl_otr.objective import OTRSettings

    hidden, weight, labels = data(5, torch.float32)
    with pytest.raises(ValueError, match="hidden states"):
        weighted_loss(hidden @ weight.T, labels, OTRSettings(), logit_transform=LogitTransform(0.5))
