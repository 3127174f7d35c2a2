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

GPU notes: off the CPU the loop never reads a device value on the host (``_sync_free``):
chunks are gathered by index instead of planned from a host copy of the row ids, NaN/Inf
logits are detected through a device flag checked once at the end of forward (the one
sync of a call), and backward scales the saved gradients in place (so only one backward
per loss there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .chunk_math import STAT_NAMES, Workspace, nonfinite_error, weighted_nll_chunk
from .objective import Objective

# fp32 bytes of logits one chunk may hold on CPU. There every torch op is one parallel
# region, and on a shared (oversubscribed) CPU each region can wait milliseconds for its
# threads, so few big ops beat cache-sized ones: measured with bench/loss_speed.py on 2
# busy cores, 2048 x 32000 OTR went from 1.3x to 1.0x cross-entropy between 32 and 128
# MiB. The chunk's three fp32 work buffers of this size are still small next to the full
# logits (or, for the hidden-state path, next to the logits it never builds).
CHUNK_BYTES = 64 * 1024 * 1024

# Chunks per call of the logits path on a GPU: one chunk's fp32 work buffers (about four
# [n, V] tensors) then take half the memory of the bf16 logits the model already holds.
GPU_LOGITS_CHUNKS = 16


def default_chunk_size(
    vocab_size: int,
    rows: int = 0,
    device: torch.device | str = "cpu",
    hidden_size: int | None = None,
) -> int:
    """Positions per chunk when ``otr_chunk_size`` is not set.

    CPU: ``CHUNK_BYTES`` of fp32 logits (measured best). GPU, hidden-state path: the
    ratio Liger-Kernel's fused linear cross-entropy uses, ``ceil(V / H)`` chunks of
    ``next_power_of_2(ceil(rows / ceil(V / H)))`` rows, so a chunk's logits are about
    the size of the batch's hidden states and the loss adds almost nothing to the peak
    memory, which on a GPU is what limits the batch (untuned: no GPU run yet). GPU,
    logits path: ``GPU_LOGITS_CHUNKS`` chunks.
    """
    if torch.device(device).type == "cpu":
        return max(1, CHUNK_BYTES // (4 * vocab_size))
    chunks = math.ceil(vocab_size / hidden_size) if hidden_size else GPU_LOGITS_CHUNKS
    per_chunk = math.ceil(max(rows, 1) / chunks)
    return 1 << (per_chunk - 1).bit_length()  # next power of two


def _sync_free(device: torch.device) -> bool:
    """Whether to avoid reading device values on the host (every device but the CPU).

    On a CPU such a read is a plain memory access, and the per-chunk checks and the
    consecutive-rows plan it allows are what the CPU benchmarks were tuned with; on a
    GPU each read stalls the launch queue until the device catches up.
    """
    return device.type != "cpu"


def _chunks(
    rows: torch.Tensor, chunk_size: int, sync_free: bool
) -> Iterator[tuple[slice, slice | None]]:
    """(positions into ``rows``, the same rows as a slice when they are consecutive)."""
    count = rows.shape[0]
    if sync_free:  # no host copy of the row ids: every chunk is gathered
        for start in range(0, count, chunk_size):
            yield slice(start, min(start + chunk_size, count)), None
        return
    # On CPU the row ids are read once to find the chunks whose rows are a consecutive
    # range; those are read and written as views.
    host = rows.tolist()
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        first, last = host[start], host[stop - 1]
        block = slice(first, last + 1) if last - first == stop - start - 1 else None
        yield slice(start, stop), block


def _gradient_buffer(like: torch.Tensor, rows: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """A gradient of ``like``'s shape whose rows that no chunk writes are zero."""
    if sync_free:  # finding the unscored rows would be a host sync; a memset is cheap
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    grad = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    scored = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    scored[rows] = True
    unscored = (~scored).nonzero().view(-1)
    if unscored.numel():
        grad.index_fill_(0, unscored, 0)
    return grad


def _check_finite(finite: torch.Tensor) -> None:
    """The one host sync of a sync-free forward: raise if any chunk saw NaN/Inf logits."""
    if not bool(finite):
        raise nonfinite_error()


class _Scaler:
    """Scales the saved gradients by the incoming gradient in backward.

    On CPU (where reading ``grad_loss`` is free) the saved tensor itself is returned
    when ``grad_loss`` is 1, so autograd can hand it over as the leaf's ``.grad``
    instead of allocating a scaled copy at the moment memory peaks. Sync-free (GPU) the
    saved tensors are scaled in place by ``grad_loss``, with no copy and no host read;
    their unscaled values are then gone, so a second backward through a retained graph
    raises instead of returning a wrong gradient.
    """

    def __init__(self, sync_free: bool) -> None:
        self.sync_free = sync_free
        self.calls = 0

    def start(self) -> None:
        """Called once per backward, before scaling."""
        self.calls += 1
        if self.sync_free and self.calls > 1:
            raise RuntimeError(
                "OTR loss: a second backward through the same loss (retain_graph=True) is "
                "not supported off CPU: the first one scaled the saved gradient in place "
                "to avoid a host sync. Compute the loss again for another backward."
            )

    def __call__(self, grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
        if grad is None:
            return None
        if self.sync_free:
            return grad.mul_(grad_loss.to(grad.dtype))
        if bool((grad_loss == 1).all()):
            return grad
        return grad * grad_loss.to(grad.dtype)


def _empty_result(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros((), dtype=torch.float32, device=device),
        torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=device),
        torch.ones((), dtype=torch.bool, device=device),
    )


class FusedLogitsLoss(torch.autograd.Function):
    """Weighted NLL from given logits [R, V]; the gradient replaces full fp32 copies."""

    @staticmethod
    def forward(ctx, logits, rows, targets, scale, objective, generator, chunk_size, compile):
        need_grad = ctx.needs_input_grad[0]
        sync_free = _sync_free(logits.device)
        if chunk_size is None:
            chunk_size = default_chunk_size(logits.shape[1], rows.shape[0], logits.device)
        loss, stats, finite = _empty_result(logits.device)
        grad = _gradient_buffer(logits, rows, sync_free) if need_grad else None
        # fp32 eager: the gradient is written in place into ``grad``
        direct = logits.dtype == torch.float32 and not compile
        workspace = Workspace()
        for part, block in _chunks(rows, chunk_size, sync_free):
            if block is not None:
                z = logits[block].float()
            else:
                z = logits.index_select(0, rows[part]).float()
            out = grad[block] if need_grad and direct and block is not None else None
            res = weighted_nll_chunk(
                z, targets[part], scale[part], objective, generator, need_grad, out,
                workspace, check_finite=not sync_free, compile=compile,
            )  # fmt: skip
            loss += res.loss
            stats += res.stats
            finite &= res.finite
            if need_grad and out is None:
                if block is not None:
                    grad[block].copy_(res.grad)
                else:
                    grad.index_copy_(0, rows[part], res.grad.to(grad.dtype))
        if sync_free:
            _check_finite(finite)
        ctx.save_for_backward(grad if need_grad else None)
        ctx.scaler = _Scaler(sync_free)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        ctx.scaler.start()
        (grad,) = ctx.saved_tensors
        return ctx.scaler(grad, grad_loss), None, None, None, None, None, None, None


class FusedLinearLoss(torch.autograd.Function):
    """Weighted NLL of ``hidden @ weight.T + bias``, one chunk of logits at a time.

    The lm_head weight and bias gradients are accumulated in fp32 over the chunks and
    cast to the parameters' dtypes once, in backward: under bf16 autocast a bf16
    accumulator would round away the small contributions of later chunks.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size, compile
    ):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        device = hidden.device
        sync_free = _sync_free(device)
        if chunk_size is None:
            chunk_size = default_chunk_size(weight.shape[0], rows.shape[0], device, hidden.shape[1])
        compute_dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else weight.dtype
        )
        fp32 = compute_dtype == torch.float32
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = _gradient_buffer(hidden, rows, sync_free) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            grad_b = (
                torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            )
            loss, stats, finite = _empty_result(device)
            workspace = Workspace()
            for part, block in _chunks(rows, chunk_size, sync_free):
                if block is not None:
                    h = hidden[block].to(compute_dtype)
                else:
                    h = hidden.index_select(0, rows[part]).to(compute_dtype)
                if fp32:
                    # Logits straight into a reused buffer: no per-chunk allocation.
                    buf = workspace.take_shape("logits", h.shape[0], w.shape[0], device)
                    z = torch.mm(h, w.t(), out=buf)
                    if b is not None:
                        z.add_(b)
                else:
                    z = F.linear(h, w, b).float()
                res = weighted_nll_chunk(
                    z, targets[part], scale[part], objective, generator, need_grad, None,
                    workspace, check_finite=not sync_free, compile=compile,
                )  # fmt: skip
                del z
                loss += res.loss
                stats += res.stats
                finite &= res.finite
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
                    if fp32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        # The chunk's product in the compute dtype (fp32 inside the GEMM),
                        # summed over chunks in fp32.
                        shape = (w.shape[0], w.shape[1])
                        part_w = workspace.take_shape("grad_w", *shape, device, compute_dtype)
                        grad_w.add_(torch.mm(g.t(), h, out=part_w))
                if need_b:
                    grad_b += res.grad.sum(0)
            if sync_free:
                _check_finite(finite)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.scaler = _Scaler(sync_free)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        ctx.scaler.start()
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = ctx.scaler(grad_h, grad_loss)
        if grad_w is not None:
            grad_w = ctx.scaler(grad_w, grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = ctx.scaler(grad_b, grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_logits_loss(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None,
    chunk_size: int | None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats) of the rows ``rows`` of 2-D ``logits``; see ``FusedLogitsLoss``.

    ``chunk_size`` None: ``default_chunk_size`` for the device. ``compile``: the
    per-chunk math through ``torch.compile`` (``chunk_math.compiled_stages``).
    """
    return FusedLogitsLoss.apply(
        logits, rows, targets, scale, objective, generator, chunk_size, compile
    )


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None,
    chunk_size: int | None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats) of the rows ``rows`` of 2-D ``hidden`` through the output layer."""
    return FusedLinearLoss.apply(
        hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size, compile
    )
