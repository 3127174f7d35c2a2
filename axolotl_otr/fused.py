"""Autograd functions that compute the loss and its gradient chunk by chunk.

The gradient is computed during the forward pass (from the closed form in
``chunk_math``) and only scaled in backward, the memory pattern of Liger-Kernel's fused
linear cross-entropy: no fp32 [positions, vocab] tensor outlives one chunk, and the
hidden-state path never materializes the logits of the whole batch at all.

Speed notes (see ``bench/loss_speed.py``): a chunk whose scored rows are consecutive
(the common case: everything but the prompt, padding and packing boundaries) is read as
a view and its gradient written straight into the result, with no gather or scatter
copy; the per-chunk buffers are reused across chunks; and backward returns the
precomputed gradient itself when the incoming gradient is 1 (a plain ``loss.backward()``),
instead of allocating a scaled copy of a [positions, vocab] tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .chunk_math import STAT_NAMES, Workspace, weighted_nll_chunk
from .objective import Objective

# fp32 bytes of logits one chunk may hold. On CPU every torch op is one parallel region,
# and on a shared (oversubscribed) CPU each region can wait milliseconds for its threads,
# so few big ops beat cache-sized ones: measured with bench/loss_speed.py on 2 busy
# cores, 2048 x 32000 OTR went from 1.3x to 1.0x cross-entropy between 32 and 128 MiB.
# The chunk's three fp32 work buffers of this size are still small next to the full
# logits (or, for the hidden-state path, next to the logits it never builds).
CHUNK_BYTES = 64 * 1024 * 1024


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk: ``CHUNK_BYTES`` of fp32 logits, for both paths."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _chunks(rows: torch.Tensor, chunk_size: int) -> Iterator[tuple[slice, slice | None]]:
    """(positions into ``rows``, the same rows as a slice when they are consecutive)."""
    # One host copy of the row ids (a sync on GPU, once per call) finds the chunks whose
    # rows are a consecutive range; those are read and written as views.
    host = rows.tolist()
    for start in range(0, len(host), chunk_size):
        stop = min(start + chunk_size, len(host))
        first, last = host[start], host[stop - 1]
        block = slice(first, last + 1) if last - first == stop - start - 1 else None
        yield slice(start, stop), block


def _zero_unscored_rows(grad: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the rows of an uninitialized ``grad`` that no chunk writes."""
    scored = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    scored[rows] = True
    unscored = (~scored).nonzero().view(-1)
    if unscored.numel():
        grad.index_fill_(0, unscored, 0)


def _scaled(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """``grad * grad_loss``, without a copy when ``grad_loss`` is exactly 1.

    Returning the saved tensor lets autograd hand it over as the leaf's ``.grad``
    (it is released from the graph first unless ``retain_graph``), where a product
    would allocate another [positions, vocab] tensor at the moment memory peaks.
    """
    if grad is None:
        return None
    if bool((grad_loss == 1).all()):
        return grad
    return grad * grad_loss.to(grad.dtype)


def _empty_result(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
        grad = None
        if need_grad:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            _zero_unscored_rows(grad, rows)
        direct = logits.dtype == torch.float32  # the gradient can be written in place
        workspace = Workspace()
        for part, block in _chunks(rows, chunk_size):
            if block is not None:
                z = logits[block].float()
            else:
                z = logits.index_select(0, rows[part]).float()
            out = grad[block] if need_grad and direct and block is not None else None
            res = weighted_nll_chunk(
                z, targets[part], scale[part], objective, generator, need_grad, out, workspace
            )
            loss += res.loss
            stats += res.stats
            if need_grad and out is None:
                if block is not None:
                    grad[block].copy_(res.grad)
                else:
                    grad.index_copy_(0, rows[part], res.grad.to(grad.dtype))
        ctx.save_for_backward(grad if need_grad else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_loss), None, None, None, None, None, None


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
        fp32 = compute_dtype == torch.float32
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = None
            if need_h:
                grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                _zero_unscored_rows(grad_h, rows)
            grad_w = torch.zeros_like(w) if need_w else None
            grad_b = (
                torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            )
            loss, stats = _empty_result(hidden.device)
            workspace = Workspace()
            for part, block in _chunks(rows, chunk_size):
                if block is not None:
                    h = hidden[block].to(compute_dtype)
                else:
                    h = hidden.index_select(0, rows[part]).to(compute_dtype)
                if fp32:
                    # Logits straight into a reused buffer: no per-chunk allocation.
                    buf = workspace.take_shape("logits", h.shape[0], w.shape[0], h.device)
                    z = torch.mm(h, w.t(), out=buf)
                    if b is not None:
                        z.add_(b)
                else:
                    z = F.linear(h, w, b).float()
                res = weighted_nll_chunk(
                    z, targets[part], scale[part], objective, generator, need_grad, None, workspace
                )
                del z
                loss += res.loss
                stats += res.stats
                if not need_grad:
                    continue
                g = res.grad if fp32 else res.grad.to(compute_dtype)
                if need_h:
                    if block is not None and fp32 and grad_h.dtype == torch.float32:
                        torch.mm(g, w, out=grad_h[block])
                    elif block is not None:
                        grad_h[block].copy_(g @ w)
                    else:
                        grad_h.index_copy_(0, rows[part], (g @ w).to(grad_h.dtype))
                if need_w:
                    grad_w.addmm_(g.t(), h)
                if need_b:
                    grad_b += res.grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = _scaled(grad_h, grad_loss)
        if grad_w is not None:
            grad_w = _scaled(grad_w, grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = _scaled(grad_b, grad_loss).to(ctx.bias_dtype)
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
