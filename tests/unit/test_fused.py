"""The chunked paths (``axolotl_otr.kernels.fused``) against the plain reference, and the benches.

Covers what the speed work in ``chunk_math``/``fused`` could break: chunks that do and do
not divide the token count, chunks whose rows are consecutive (views) or not (gathers),
masked tokens, tied and untied lm_head, LoRA on the lm_head, a frozen tied lm_head, a
non-unit upstream gradient, ``retain_graph``, and seeded sampling.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.kernels.fused import fused_linear_loss
from axolotl_otr.loss import select_targets
from axolotl_otr.model.output_layer import _layer_accessor
from axolotl_otr.objective import Objective
from tests.support.examples import REPO
from tests.support.reference import (
    hidden_reference,
    loss_on_path,
)

ROOT = str(REPO)
B, T, H, V = 2, 11, 8, 29


def data(seed: int, masked: bool):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    if masked:
        labels[0, :3] = -100
        labels[1, 5] = -100
        labels[1, 9:] = -100
    return hidden, weight, labels


# 1 and 4 do not divide the 20 (masked: 14) scored rows, 5 and 10 divide 20; 7 splits
# the masked batch at a hole (a gathered chunk); 64 is one chunk.
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 10, 64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("estimator", ["exact", "sampled"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_chunked_equals_reference(path, estimator, masked, chunk_size, recorded_draws):
    hidden, weight, labels = data(0, masked)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(estimator=estimator, chunk_size=chunk_size, generator=gen)
    loss = loss_on_path(path, hidden, weight, labels, **kwargs)
    ref = hidden_reference(hidden, weight, labels, estimator, recorded_draws)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(ref, (hidden, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_upstream_gradient_scales_and_retain_graph_keeps_it():
    hidden, weight, labels = data(2, True)
    logits = (hidden @ weight.T).detach().requires_grad_()
    loss = otr_loss(logits, labels, estimator="exact", chunk_size=3)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    (3.0 * loss).backward()  # second backward through the same graph, scaled
    torch.testing.assert_close(logits.grad, 4.0 * first)


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_tied_lm_head_gets_both_gradients(estimator):
    gen = torch.Generator().manual_seed(3)
    emb = nn.Embedding(V, H)
    proj = nn.Linear(H, H)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100

    def loss_of(fused: bool):
        emb.zero_grad()
        proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        kwargs = dict(estimator=estimator, generator=torch.Generator().manual_seed(4))
        if fused:
            loss = otr_loss_from_hidden(hidden, emb.weight, labels, chunk_size=6, **kwargs)
        else:
            loss = otr_loss(hidden @ emb.weight.T, labels, chunk_size=10**6, **kwargs)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    for a, b in zip(loss_of(True), loss_of(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_lm_head_gets_no_weight_gradient():
    hidden, weight, labels = data(5, True)
    frozen = weight.detach()
    loss = otr_loss_from_hidden(hidden, frozen, labels, estimator="exact", chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref = hidden_reference(hidden, frozen, labels, "exact")
    torch.testing.assert_close(grad, torch.autograd.grad(ref, hidden)[0], rtol=1e-4, atol=1e-6)
    assert frozen.grad is None


class _OutputShapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_same_seed_same_samples(path, recorded_draws):
    hidden, weight, labels = data(9, True)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        if path == "hidden":
            return otr_loss_from_hidden(hidden, weight, labels, chunk_size=4, generator=gen)
        return otr_loss(hidden @ weight.T, labels, chunk_size=4, generator=gen)

    first = run(1)
    first_draws = torch.cat(recorded_draws)
    recorded_draws.clear()
    assert torch.equal(first, run(1))
    assert torch.equal(first_draws, torch.cat(recorded_draws))
    recorded_draws.clear()
    run(2)
    assert not torch.equal(first_draws, torch.cat(recorded_draws))


@pytest.mark.parametrize(
    "module,keys",
    [
        ("bench.loss_speed", ("otr_sampled_vs_ce", "otr_exact_vs_ce")),
        ("bench.step_time", ("step_time_ratio", "peak_mem_ratio")),
        ("bench.loss_memory", ("otr_vs_sft_chunked", "otr_vs_sft_full", "trainable_head_copies")),
    ],
)
def test_bench_quick_smoke(module, keys):
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    pairs = dict(re.findall(r"(\w+)=(\S+)", last))
    for key in keys:
        assert key in pairs, last
        float(pairs[key])


def test_lora_on_lm_head_matches_the_wrapped_layer():
    peft = pytest.importorskip("peft")

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(H, V, bias=False)

        def forward(self, x):
            return self.lm_head(x)

    torch.manual_seed(6)
    config = peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(Head(), config)
    head = model.base_model.model.lm_head
    accessor = _layer_accessor(head).weight_and_bias
    assert accessor is not None
    hidden, _, labels = data(7, True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A and lora_B

    def grads(fused: bool):
        gen = torch.Generator().manual_seed(8)
        if fused:
            targets = select_targets(labels)
            weight, bias, low_rank = accessor()
            assert weight is head.base_layer.weight  # no W + B A
            loss = fused_linear_loss(
                hidden.reshape(-1, H), weight, bias, targets.rows, targets.tokens, targets.scale,
                Objective(), gen, 5, low_rank=low_rank,
            )[0]  # fmt: skip
        else:
            loss = otr_loss(model(hidden), labels, chunk_size=5, generator=gen)
        return (loss, *torch.autograd.grad(loss, [hidden, *params]))

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    shapes = _OutputShapes()
    with shapes:
        grads(True)
    assert (V, H) not in shapes.seen  # low-rank: W + B A is never formed
