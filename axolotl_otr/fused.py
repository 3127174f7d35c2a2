"""Autograd functions that compute the loss and its gradient chunk by chunk.

The gradient is computed during the forward pass (from the closed form in
``chunk_math``) and only scaled in backward, the memory pattern of Liger-Kernel's fused
linear cross-entropy: no fp32 [positions, vocab] tensor outlives one chunk, and the
hidden-state path never materializes the logits of the whole batch at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunk_math import STAT_NAMES, weighted_nll_chunk
from .objective import Objective

# fp32 bytes of logits one chunk may hold: big enough for efficient matmuls, small
# enough to stay in cache on CPU and to keep the GPU footprint far below full logits.
CHUNK_BYTES = 8 * 1024 * 1024


def default_chunk_size(vocab_size: int, from_hidden: bool) -> int:
    """Positions per chunk: cache-sized for logits, matmul-friendly for hidden states."""
    budget = CHUNK_BYTES * (8 if from_hidden else 1)
    return max(1, budget // (4 * vocab_size))


def _chunks(rows: torch.Tensor, chunk_size: int):
    for start in range(0, rows.numel(), chunk_size):
        yield slice(start, start + chunk_size)


def _empty_result(device: torch.device):
    return (
        torch.zeros((), dtype=torch.float32, device=device),
        torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=device),
    )


class FusedLogitsLoss(torch.autograd.Function):
    """Weighted NLL from given logits [R, V]; the gradient replaces full fp32 copies."""

    @staticmethod
    def forward(ctx, logits, rows, targets, scale, objective, generator, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        loss, stats = _empty_result(logits.device)
        grad = torch.zeros_like(logits) if need_grad else None
        for part in _chunks(rows, chunk_size):
            z = logits.index_select(0, rows[part]).float()
            out = weighted_nll_chunk(z, targets[part], scale[part], objective, generator, need_grad)
            loss += out.loss
            stats += out.stats
            if need_grad:
                grad.index_copy_(0, rows[part], out.grad.to(grad.dtype))
        ctx.save_for_backward(grad if need_grad else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        if grad is not None:
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None, None


class FusedLinearLoss(torch.autograd.Function):
    """Weighted NLL of ``hidden @ weight.T + bias``, one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else weight.dtype
        )
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            grad_b = (
                torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            )
            loss, stats = _empty_result(hidden.device)
            for part in _chunks(rows, chunk_size):
                h = hidden.index_select(0, rows[part]).to(compute_dtype)
                z = F.linear(h, w, b).float()
                out = weighted_nll_chunk(
                    z, targets[part], scale[part], objective, generator, need_grad
                )
                del z
                loss += out.loss
                stats += out.stats
                if not need_grad:
                    continue
                g = out.grad.to(compute_dtype)
                if need_h:
                    grad_h.index_copy_(0, rows[part], (g @ w).to(grad_h.dtype))
                if need_w:
                    grad_w.addmm_(g.t(), h)
                if need_b:
                    grad_b += out.grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss.to(grad_w.dtype)).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_logits_loss(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats) of the rows ``rows`` of 2-D ``logits``; see ``FusedLogitsLoss``."""
    return FusedLogitsLoss.apply(logits, rows, targets, scale, objective, generator, chunk_size)


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats) of the rows ``rows`` of 2-D ``hidden`` through the output layer."""
    return FusedLinearLoss.apply(
        hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size
    )
