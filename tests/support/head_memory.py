"""lm_head gradient workloads shared by the CPU memory/precision tests
(tests/unit/test_weight_grad.py) and their CUDA twins (tests/gpu/test_gpu.py)."""

from __future__ import annotations

import torch

from axolotl_otr import otr_loss, otr_loss_from_hidden
from bench.memory_probe import peak_bytes


def batch(tokens, hidden_size, vocab, dtype, seed=0, target_logit=0.0):
    """Hidden states [1, tokens + 1, D], an lm_head [V, D] and labels; with
    ``target_logit`` the hidden states point at their target rows (p(y) well above 1/V)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    hidden = torch.randn(1, tokens + 1, hidden_size, generator=gen)
    if target_logit:
        rows = weight[labels[0, 1:]]
        hidden[0, :-1] += target_logit * rows / rows.norm(dim=1, keepdim=True) ** 2
    return hidden.to(dtype), weight.to(dtype), labels


def trainable_head_cost(device: str = "cpu") -> tuple[float, torch.dtype]:
    """(trainable minus frozen peak in bf16 weight sizes, the weight gradient's dtype)."""
    # V x D = 16384 x 1024 (32 MiB in bf16): the ratio is that of 65536 x 1024 to 0.01
    # (2.085 here), at a quarter of the CPU time.
    hidden, weight, labels = batch(128, 1024, 16384, torch.bfloat16)
    hidden, weight, labels = (t.to(device) for t in (hidden, weight, labels))
    hidden.requires_grad_()
    size = weight.numel() * weight.element_size()

    def run(trainable: bool):
        w = weight.detach().requires_grad_(trainable)
        loss = otr_loss_from_hidden(hidden, w, labels)
        grads = torch.autograd.grad(loss, [hidden, w] if trainable else [hidden])
        return grads[-1].dtype

    dtype, trainable = peak_bytes(lambda: run(True), device)
    _, frozen = peak_bytes(lambda: run(False), device)
    return (trainable - frozen) / size, dtype


def fp16_gradient_errors(device: str = "cpu", path: str = "hidden") -> tuple[float, float, float]:
    """(relative error, share of non-zero entries lost, mean p(y)) of the fp16 gradient
    (of the hidden states, or of the logits on the logits path) against fp32 math on the
    same inputs, in the issue's case."""
    hidden, weight, labels = batch(512, 64, 4096, torch.float16, seed=1, target_logit=8.0)
    hidden, weight, labels = (t.to(device) for t in (hidden, weight, labels))
    kwargs = dict(estimator="exact", num_items_in_batch=8192)
    scale = 2.0**10
    if path == "hidden":
        x16 = hidden.detach().requires_grad_()
        (scale * otr_loss_from_hidden(x16, weight, labels, **kwargs)).backward()
        x32 = hidden.detach().float().requires_grad_()
        (scale * otr_loss_from_hidden(x32, weight.float(), labels, **kwargs)).backward()
    else:
        logits = (hidden.float() @ weight.float().T).half()
        x16 = logits.detach().requires_grad_()
        (scale * otr_loss(x16, labels, **kwargs)).backward()
        x32 = logits.detach().float().requires_grad_()
        (scale * otr_loss(x32, labels, **kwargs)).backward()
    got, want = x16.grad[0, :-1].float(), x32.grad[0, :-1]
    p_target = torch.softmax(hidden[0, :-1].float() @ weight.float().T, -1)
    p_target = p_target.gather(1, labels[0, 1:, None]).mean().item()
    error = ((got - want).norm() / want.norm()).item()
    lost = ((got == 0) & (want != 0)).sum().item() / (want != 0).sum().item()
    return error, lost, p_target


def head_batch(dtype, vocab=51, width=32, rows=257, seed=6):
    """Nearly parallel hidden states, so one-row chunks add up coherently in the weight
    gradient (where a 16-bit sum would swamp the later chunks)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, width, generator=gen)
    hidden = (base + 0.1 * torch.randn(1, rows, width, generator=gen)).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) / 4).to(dtype)
    labels = torch.randint(0, vocab, (1, rows), generator=gen)
    return hidden, weight, labels
