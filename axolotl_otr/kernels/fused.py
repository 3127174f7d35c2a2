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

from collections.abc import Iterator

import torch

from ..objective import Objective
from .chunk_budget import (
    CPU_CHUNK_BYTES,
    default_rows,
    row_buffers,
)
from .chunk_math import STAT_NAMES, Workspace, nonfinite_error, weighted_nll_chunk
from .transform import LogitTransform
from .weight_grad import WeightGradAccumulator

# The CPU budget of one chunk's buffers (all of them, see ``chunk_budget``).
CHUNK_BYTES = CPU_CHUNK_BYTES


def default_chunk_size(
    vocab_size: int,
    rows: int = 0,
    device: torch.device | str = "cpu",
    hidden_size: int | None = None,
    *,
    objective: Objective | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> int:
    """Positions per chunk when ``otr_chunk_size`` is not set: as many as fit the
    device's byte budget (``chunk_budget.default_budget``) with every buffer a chunk of
    this objective and compute dtype holds counted (``chunk_budget.row_buffers``); off
    the CPU, on the hidden-state path, never fewer than Liger-Kernel's rows for the same
    shape (``chunk_budget.default_rows``). ``device`` is only read for its type, so a
    CPU test can ask what a CUDA run would use."""
    buffers = row_buffers(vocab_size, objective or Objective(), compute_dtype, hidden_size, device)
    return default_rows(device, vocab_size, rows, hidden_size, buffers)


def compute_dtype_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the chunk GEMMs: the autocast dtype where autocast is on, else the
    activations' precision, i.e. the narrower of the hidden states' and the weight's
    dtypes (an fp32 lm_head next to bf16 activations runs in bf16, as the model's other
    layers do; bf16 weights next to hidden states upcast to fp32 run in bf16)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype == torch.float32:
        return weight.dtype if weight.dtype.is_floating_point else hidden.dtype
    return hidden.dtype


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
    when the factor is 1, so autograd can hand it over as the leaf's ``.grad`` instead of
    allocating a scaled copy at the moment memory peaks. Sync-free (GPU), or where a
    saved gradient is converted in its own storage (``in_place``), the saved tensors are
    scaled in place, with no copy and no host read; their unscaled values are then gone,
    so a second backward through a retained graph raises instead of returning a wrong
    gradient.
    """

    def __init__(self, sync_free: bool, in_place: bool = False) -> None:
        self.sync_free = sync_free
        self.in_place = sync_free or in_place
        self.calls = 0

    def start(self) -> None:
        """Called once per backward, before scaling."""
        self.calls += 1
        if self.in_place and self.calls > 1:
            raise RuntimeError(
                "OTR loss: a second backward through the same loss (retain_graph=True) is "
                "not supported off CPU or with a 16-bit trainable lm_head: the first one "
                "scaled the saved gradient in place to avoid a host sync or a second copy "
                "of the weight. Compute the loss again for another backward."
            )

    def __call__(self, grad: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor | None:
        """``grad * factor`` (``factor``: fp32 0-dim, applied in fp32 math)."""
        if grad is None:
            return None
        if self.in_place:
            return grad.mul_(factor)
        if bool((factor == 1).all()):
            return grad
        return grad * factor


def _range_reference(scale: torch.Tensor, low_range: bool) -> torch.Tensor | None:
    """The largest per-position weight, when gradients are stored in fp16.

    With ``num_items_in_batch`` positions, a logit gradient entry is about pi / num_items:
    in fp16 that is subnormal or zero before GradScaler's factor arrives in backward. The
    chunks then use ``scale / reference`` (entries of the size of pi) and backward
    multiplies by ``grad_output * reference`` in fp32 math, so the stored fp16 gradients
    keep their precision and the result is what fp16 autograd gives with the loss scale.
    """
    if not low_range or not scale.numel():
        return None
    return scale.amax()


def _empty_result(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros((), dtype=torch.float32, device=device),
        torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=device),
        torch.ones((), dtype=torch.bool, device=device),
    )


def _factor(grad_loss: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    factor = grad_loss.float()
    return factor if reference is None else factor * reference


class FusedLogitsLoss(torch.autograd.Function):
    """Weighted NLL from given logits [R, V]; the gradient replaces full fp32 copies."""

    @staticmethod
    def forward(ctx, logits, rows, targets, scale, objective, generator, chunk_size, compile):
        need_grad = ctx.needs_input_grad[0]
        sync_free = _sync_free(logits.device)
        if chunk_size is None:
            chunk_size = default_chunk_size(
                logits.shape[1], rows.shape[0], logits.device,
                objective=objective, compute_dtype=logits.dtype,
            )  # fmt: skip
        reference = _range_reference(scale, need_grad and logits.dtype == torch.float16)
        if reference is not None:
            scale = scale / reference
        loss, stats, finite = _empty_result(logits.device)
        grad = _gradient_buffer(logits, rows, sync_free) if need_grad else None
        # fp32 eager: the gradient is written in place into ``grad``
        direct = logits.dtype == torch.float32 and not compile
        workspace = Workspace()
        for part, block in _chunks(rows, chunk_size, sync_free):
            # 16-bit logits are read as they are: the chunk math computes in fp32
            z = logits[block] if block is not None else logits.index_select(0, rows[part])
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
        if reference is not None:
            loss = loss * reference
        ctx.save_for_backward(grad if need_grad else None)
        ctx.scaler = _Scaler(sync_free)
        ctx.reference = reference
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        ctx.scaler.start()
        (grad,) = ctx.saved_tensors
        grad = ctx.scaler(grad, _factor(grad_loss, ctx.reference))
        return grad, None, None, None, None, None, None, None


class FusedLinearLoss(torch.autograd.Function):
    """Weighted NLL of ``hidden @ weight.T + bias``, one chunk of logits at a time.

    The GEMMs run in ``compute_dtype_of(hidden, weight)``. The lm_head weight and bias
    gradients are accumulated in fp32 over the chunks (under bf16 a bf16 accumulator
    would round away the small contributions of later chunks), the weight's in one
    16-bit-in, fp32-out GEMM per chunk where the device has it (``weight_grad``), and
    backward converts it to the weight's dtype in the accumulator's own memory into a
    tensor that owns exactly its bytes: a trainable 16-bit lm_head costs one fp32
    accumulator (two copies of itself) during the call and its own size after it.

    ``lora_a`` [r, D] and ``lora_b`` [V, r] (the LoRA scaling folded in) add a low-rank
    term, ``z = h W.T + (h A.T) B.T``: the adapter's gradients come from [n, r]
    products, and ``W + B A`` is never formed.

    ``transform`` (``transform.LogitTransform``): the model's logits are a scaled or
    soft-capped ``h W.T + b``; each chunk's logits are transformed in place and its
    gradient taken through the transform in closed form (``chunk_math.chunk_tail``).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size,
        compile, lora_a=None, lora_b=None, transform=None,
    ):  # fmt: skip
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # ``apply`` without the two optional LoRA inputs gives 10 flags, not 12
        need_la, need_lb = (*ctx.needs_input_grad[10:12], False, False)[:2]
        ctx.inputs = len(ctx.needs_input_grad)
        need_grad = need_h or need_w or need_b or need_la or need_lb
        device = hidden.device
        sync_free = _sync_free(device)
        vocab, width = weight.shape
        compute_dtype = compute_dtype_of(hidden, weight)
        if chunk_size is None:
            # Every position given, scored or not, as Liger-Kernel counts them (on CPU
            # only the byte budget matters)
            chunk_size = default_chunk_size(
                vocab, hidden.shape[0], device, width,
                objective=objective, compute_dtype=compute_dtype,
            )  # fmt: skip
        fp32 = compute_dtype == torch.float32
        low_range = torch.float16 in (compute_dtype, hidden.dtype)
        reference = _range_reference(scale, need_grad and low_range)
        if reference is not None and transform is not None:
            # the transform's factor dz/dr = s too: fp16 chunk gradients stay of size pi
            reference = reference * transform.scale
        if reference is not None:
            scale = scale / reference
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            low_rank = lora_a is not None
            la = lora_a.to(compute_dtype) if low_rank else None
            lb = lora_b.to(compute_dtype) if low_rank else None
            grad_la = torch.zeros(la.shape, dtype=torch.float32, device=device) if need_la else None
            grad_lb = torch.zeros(lb.shape, dtype=torch.float32, device=device) if need_lb else None
            grad_h = _gradient_buffer(hidden, rows, sync_free) if need_h else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
            loss, stats, finite = _empty_result(device)
            workspace = Workspace()
            grad_w = None
            if need_w:
                grad_w = WeightGradAccumulator(
                    vocab, width, device, compute_dtype, weight.dtype, workspace
                )
            for part, block in _chunks(rows, chunk_size, sync_free):
                if block is not None:
                    h = hidden[block].to(compute_dtype)
                else:
                    h = hidden.index_select(0, rows[part]).to(compute_dtype)
                # Logits straight into a reused buffer: no per-chunk allocation.
                buf = workspace.take_shape("logits", h.shape[0], vocab, device, compute_dtype)
                if b is None:
                    z = torch.mm(h, w.t(), out=buf)
                else:  # the bias inside the GEMM: one rounding to the compute dtype
                    z = torch.addmm(b, h, w.t(), out=buf)
                u = None
                if low_rank:
                    u = h @ la.t()  # [n, r]
                    z.addmm_(u, lb.t())
                res = weighted_nll_chunk(
                    z, targets[part], scale[part], objective, generator, need_grad, None,
                    workspace, check_finite=not sync_free, compile=compile, transform=transform,
                )  # fmt: skip
                loss += res.loss
                stats += res.stats
                finite &= res.finite
                if not need_grad:
                    continue
                # the logit gradient in the compute dtype, in the logits' buffer (z is dead)
                g = res.grad if fp32 else buf.copy_(res.grad)
                g_b = g @ lb if low_rank else None  # [n, r]
                if need_h:
                    direct = block is not None and grad_h.dtype == compute_dtype
                    g_h = torch.mm(g, w, out=grad_h[block]) if direct else g @ w
                    if low_rank:
                        g_h.addmm_(g_b, la)
                    if block is None:
                        grad_h.index_copy_(0, rows[part], g_h.to(grad_h.dtype))
                    elif not direct:
                        grad_h[block].copy_(g_h)
                if need_la:
                    grad_la += g_b.t() @ h
                if need_lb:
                    grad_lb += g.t() @ u
                if need_w:
                    grad_w.add(g, h)
                if need_b:
                    grad_b += res.grad.sum(0)
            if sync_free:
                _check_finite(finite)
        if reference is not None:
            loss = loss * reference
        narrow = need_w and grad_w.narrow
        # A 16-bit weight's accumulator stays on ctx (backward converts it in its own
        # memory and lets go of it); an fp32 one is saved as it is.
        ctx.weight_grad = grad_w if narrow else None
        grad_w = grad_w.fp32() if need_w and not narrow else None
        ctx.save_for_backward(grad_h, grad_w, grad_b, grad_la, grad_lb)
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype) if low_rank else None
        ctx.scaler = _Scaler(sync_free, in_place=narrow)
        ctx.reference = reference
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        ctx.scaler.start()
        grad_h, grad_w, grad_b, grad_la, grad_lb = ctx.saved_tensors
        factor = _factor(grad_loss, ctx.reference)
        grad_h = ctx.scaler(grad_h, factor)
        if ctx.weight_grad is not None:
            grad_w = ctx.weight_grad.narrowed(factor)
            ctx.weight_grad = None
        elif grad_w is not None:
            grad_w = ctx.scaler(grad_w, factor)
        if grad_b is not None:
            grad_b = ctx.scaler(grad_b, factor).to(ctx.bias_dtype)
        if grad_la is not None:
            grad_la = ctx.scaler(grad_la, factor).to(ctx.lora_dtypes[0])
        if grad_lb is not None:
            grad_lb = ctx.scaler(grad_lb, factor).to(ctx.lora_dtypes[1])
        nothing = (None,) * 7  # rows, targets, scale, objective, generator, chunk_size, compile
        return (grad_h, grad_w, grad_b, *nothing, grad_la, grad_lb, None)[: ctx.inputs]


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
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats) of the rows ``rows`` of 2-D ``hidden`` through the output layer.

    ``low_rank``: a LoRA adapter on the output layer as (A [r, D], scaling * B [V, r]).
    ``transform``: the model's map from the output layer's output to its logits
    (scaling, soft-capping; ``transform.py``), None or identity for plain logits.
    """
    lora_a, lora_b = low_rank if low_rank is not None else (None, None)
    if transform is not None and transform.is_identity:
        transform = None
    return FusedLinearLoss.apply(
        hidden, weight, bias, rows, targets, scale, objective, generator, chunk_size, compile,
        lora_a, lora_b, transform,
    )  # fmt: skip
