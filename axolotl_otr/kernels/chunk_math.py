"""Per-chunk math: loss, closed-form logit gradient and metrics of a weighted NLL.

Every objective this package offers is a weighted negative log-likelihood
``l_t = -sum_a w_a log pi(a)`` with ``w`` detached (see ``docs/algorithm.md``):

- sft: ``w = one_hot(y)``
- dft: ``w = sg(pi(y)) * one_hot(y)``
- otr, exact: ``w = (1 - beta) * pi'(y) * one_hot(y) + beta * pi'``
- otr, sampled: ``w = (1 - beta) * hits / K * one_hot(y) + beta * counts / K``
- otr with ``sft_mix = lambda > 0``: ``w = lambda * one_hot(y) + (1 - lambda) * w_otr``

so its logit gradient is ``(sum_a w_a) * pi - w``. This module computes the loss and
that gradient for one chunk of positions in a single pass, on fp32 logits, without ever
building anything of shape [positions, K, vocab].

Speed notes (measured with ``bench/loss_speed.py``): the loss is memory-bound, so every
[n, V] pass counts. The chunk's buffers come from a ``Workspace`` that the caller reuses
across chunks (a fresh multi-megabyte tensor per chunk costs page faults that were the
biggest single cost on CPU), the gradient is built in the softmax's own buffer (which may
be the caller's final gradient storage), softmax normalizations are folded into per-row
factors instead of a division pass, and the sampler gets unnormalized weights.

GPU notes: nothing here reads a device value on the host (the NaN/Inf test is a device
flag the caller checks once per loss call), and the math before and after sampling is
two functions, ``chunk_head`` and ``chunk_tail``, that ``torch.compile(fullgraph=True)``
traces whole (``compiled_stages``), so Inductor can fuse their [n, V] passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..objective import Objective
from .transform import LogitTransform, softcap_chain_

# Order of the per-chunk statistics vector (sums over positions, unscaled).
# argmax_share: targets that are the row's largest logit (a tie counts as the argmax).
STAT_NAMES = ("tokens", "ce", "p_target", "hit_rate", "entropy", "argmax_share")


@dataclass
class ChunkResult:
    """What one chunk contributes: the scaled loss sum, its gradient and statistics."""

    loss: torch.Tensor  # scalar, sum_t scale_t * l_t
    grad: torch.Tensor | None  # [n, V] fp32, scale_t * dl_t/dz_t
    stats: torch.Tensor  # [len(STAT_NAMES)] fp32 sums
    finite: torch.Tensor  # 0-dim bool on the logits' device: no NaN/Inf row


@dataclass
class Workspace:
    """Reusable fp32 scratch buffers, one per name, grown on demand.

    Chunks of one loss call have the same shape, so after the first chunk no [n, V]
    tensor is allocated any more: fresh large allocations are returned to the OS on
    free and page-faulted back in on the next chunk, which cost more than the math.
    """

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A contiguous fp32 buffer of ``like``'s 2-D shape and device (contents undefined)."""
        return self.take_shape(name, like.shape[0], like.shape[1], like.device)

    def take_shape(
        self,
        name: str,
        rows: int,
        cols: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A contiguous [rows, cols] buffer on ``device`` (contents undefined)."""
        shape = (rows, cols)
        numel = rows * cols
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


def rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [n, V] tensors, using ``scratch`` for the product.

    A multiply into a reused buffer then a sum is two cache-resident passes;
    ``torch.bmm`` of [n, 1, V] x [n, V, 1] was 10-50x slower on CPU.
    """
    return torch.mul(a, b, out=scratch).sum(-1)


def sample_tokens(
    weights: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None,
    *,
    cdf: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    sanitize: bool = False,
) -> torch.Tensor:
    """[n, K] token ids drawn with replacement, P(a) proportional to ``weights[:, a]``.

    Inverse CDF: the row's cumulative sums, K uniforms from ``generator`` scaled by the
    row's total, and a binary search (``searchsorted``) per draw; O(V + K log V), nothing
    of shape [n, K, V]. ``torch.multinomial`` did the same but allocated its own copies of
    the [n, V] weights, and for K = 1 took a path that reads the device on the host. Every
    buffer can be given: ``cdf`` (may be ``weights`` itself, which is then overwritten),
    ``uniforms`` [n, K] fp32 and ``out`` [n, K] int64. Rows need not sum to 1; a token of
    weight 0 is never drawn. Resolution: fp32 cumulative sums and 24-bit uniforms, as
    ``torch.multinomial`` on CUDA. ``sanitize``: NaN/Inf rows (which the caller reports
    later) get harmless draws instead of an undefined search.
    """
    n = weights.shape[0]
    if cdf is weights:
        cdf = weights.cumsum_(1)
    else:
        cdf = torch.cumsum(weights, 1, out=cdf)
    if sanitize:
        cdf.nan_to_num_(nan=1.0, posinf=1.0)
    total = cdf[:, -1:]
    if uniforms is None:
        uniforms = torch.empty(n, num_samples, dtype=cdf.dtype, device=cdf.device)
    uniforms.uniform_(generator=generator).mul_(total)
    # u < 1, but u * total can round up to total; the largest float below it keeps every
    # draw inside the row (on the last token of positive weight).
    torch.minimum(uniforms, torch.nextafter(total, torch.zeros_like(total)), out=uniforms)
    return torch.searchsorted(cdf, uniforms, right=True, out=out)


class Head(NamedTuple):
    """Everything the chunk's loss and gradient need before any token is sampled."""

    pi: torch.Tensor  # [n, V] exp(z - max), unnormalized (later the gradient's buffer)
    inv_sum: torch.Tensor  # [n, 1] 1 / sum(pi)
    lse: torch.Tensor  # [n, 1] log-sum-exp of z
    logp_y: torch.Tensor  # [n] log pi(y)
    entropy: torch.Tensor  # [n]
    rollout: torch.Tensor | None  # [n, V] unnormalized rollout policy pi' (OTR only)
    inv_rollout_sum: torch.Tensor | None  # [n, 1] 1 / sum(rollout), when computed
    finite: torch.Tensor  # 0-dim bool: every row's max logit is finite
    target_is_max: torch.Tensor  # [n] bool: z_y is the row's largest logit


def nonfinite_error() -> FloatingPointError:
    """The error every path raises when the logits hold NaN or Inf."""
    return FloatingPointError(
        "OTR loss: the logits contain NaN or Inf; the model's forward pass diverged "
        "(check the learning rate, the data, or fp16 overflow)."
    )


def _buffer(ws: Workspace | None, name: str, like: torch.Tensor) -> torch.Tensor | None:
    """A reused buffer in eager mode; None (a fresh tensor) when compiled or without one."""
    return ws.take(name, like) if ws is not None else None


def chunk_head(
    z: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    out: torch.Tensor | None = None,
    ws: Workspace | None = None,
) -> Head:
    """Softmax, log pi(y), entropy and the rollout weights of one chunk (no sampling).

    ``y`` is [n, 1]; ``z`` may be in a 16-bit compute dtype (every pass reads it into fp32
    math). No host sync: whether the logits are finite is returned as a device flag, so a
    caller on a GPU can check it once per loss call. Buffers (``chunk_budget.row_buffers``
    counts them): ``pi`` (or ``out``), and ``aux``, which holds the entropy's product, then
    the rollout policy (later the sampler's CDF).
    """
    row_max = z.amax(-1, keepdim=True).float()
    finite = torch.isfinite(row_max).all()
    target_is_max = (z.gather(1, y) >= row_max).view(-1)
    # exp(z - max), left unnormalized: 1 / sum is folded into the per-row factors below,
    # which saves a division pass. (torch.softmax and max-with-indices would save a pass
    # too, but they spawn threads even for tiny rows, which costs milliseconds per call
    # on a busy CPU.)
    pi = torch.sub(z, row_max, out=out if out is not None else _buffer(ws, "pi", z)).exp_()
    inv_sum = pi.sum(-1, keepdim=True).reciprocal_()
    lse = row_max - inv_sum.log()
    logp_y = z.gather(1, y).float().sub_(lse).view(-1)
    entropy = lse.view(-1) - rowdot(pi, z, _buffer(ws, "aux", z)) * inv_sum.view(-1)
    rollout = inv_rollout_sum = None
    if objective.kind == "otr":
        kappa = objective.temperature
        if kappa == 1.0:
            rollout, inv_rollout_sum = pi, inv_sum
        else:
            # exp((z - max) / kappa) in one pass: -max / kappa + z / kappa.
            shift = row_max * (-1.0 / kappa)
            rollout = torch.add(shift, z, alpha=1.0 / kappa, out=_buffer(ws, "aux", z))
            rollout = rollout.exp_()
    return Head(pi, inv_sum, lse, logp_y, entropy, rollout, inv_rollout_sum, finite, target_is_max)


def chunk_tail(
    z: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    head: Head,
    draws: torch.Tensor | None,
    need_grad: bool,
    ws: Workspace | None = None,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scaled loss sum, gradient or None, statistics) from the head and the draws.

    The gradient is built in place in ``head.pi``'s buffer. With a ``transform``, ``z``
    holds the transformed logits and the gradient is taken with respect to the lm_head's
    output ``r`` (``transform.py``): its scale is folded into the per-row factors, its
    soft-capping factor ``1 - (z / c)^2`` is one more product (``aux`` is free by then).
    """
    pi, inv_sum, lse, logp_y, entropy = head.pi, head.inv_sum, head.lse, head.logp_y, head.entropy
    p_y = logp_y.exp()
    beta = 0.0  # weight of the dense (non-target) rollout term in w
    dense_beta = None  # exp((z - max) / kappa), entering w with weight beta (exact OTR)
    dense_factor = None  # its per-row factor in the gradient
    if objective.kind == "sft":
        target_weight = torch.ones_like(p_y)
        total_weight = target_weight
        loss_t = -logp_y
        hit = p_y
    elif objective.kind == "dft":
        target_weight = p_y
        total_weight = p_y
        loss_t = -p_y * logp_y
        hit = p_y
    else:
        lam = objective.sft_mix
        # The mix scales every OTR weight by (1 - lambda) and adds lambda at the target.
        beta = (1.0 - lam) * objective.beta
        target_share = (1.0 - lam) * (1.0 - objective.beta)
        rollout = head.rollout
        if objective.estimator == "exact":
            inv_rollout_sum = head.inv_rollout_sum
            if inv_rollout_sum is None:
                inv_rollout_sum = rollout.sum(-1, keepdim=True).reciprocal_()
            hit = rollout.gather(1, y).mul_(inv_rollout_sum).view(-1)
            target_weight = lam + target_share * hit
            total_weight = beta + target_weight
            # E_{pi'}[log pi]; ``aux`` is free when the rollout policy is pi (kappa = 1)
            product = _buffer(ws, "product" if rollout is not pi else "aux", z)
            mean_logp = rowdot(rollout, z, product) * inv_rollout_sum.view(-1) - lse.view(-1)
            loss_t = -(beta * mean_logp + target_weight * logp_y)
            dense_beta = rollout
            dense_factor = inv_rollout_sum.view(-1)
        else:
            k = objective.num_samples
            hit = (draws == y).sum(1).float() / k
            target_weight = lam + target_share * hit
            total_weight = beta + target_weight
            mean_logp = z.gather(1, draws).float().mean(1) - lse.view(-1)  # mean_k log pi(a_k)
            loss_t = -(beta * mean_logp + target_weight * logp_y)

    stats = torch.stack(
        [
            torch.ones_like(p_y).sum(), (-logp_y).sum(), p_y.sum(), hit.sum(), entropy.sum(),
            head.target_is_max.to(p_y.dtype).sum(),
        ]
    )  # fmt: skip
    loss = (loss_t * scale).sum()
    if not need_grad:
        return loss, None, stats

    # grad = scale * (total_weight * pi - w), built in place in pi's buffer (which holds
    # exp(z - max); inv_sum normalizes it); times dz/dr's constant factor, if any.
    if transform is not None and transform.scale != 1.0:
        scale = scale * transform.scale
    grad = pi
    if dense_beta is pi:  # kappa == 1: the beta * pi' term folds into the pi term
        grad.mul_(((total_weight - beta) * scale).unsqueeze(1) * inv_sum)
    else:
        grad.mul_((total_weight * scale).unsqueeze(1) * inv_sum)
        if dense_beta is not None:
            grad.addcmul_(dense_beta, (-beta * scale * dense_factor).unsqueeze(1))
    grad.scatter_add_(1, y, (-target_weight * scale).unsqueeze(1))
    if draws is not None:
        per_draw = (-beta / objective.num_samples) * scale
        grad.scatter_add_(1, draws, per_draw.unsqueeze(1).expand_as(draws))
    if transform is not None and transform.softcap is not None:
        softcap_chain_(grad, z, transform.softcap, _buffer(ws, "aux", z))
    return loss, grad, stats


_COMPILED: dict[str, Callable] = {}


def compiled_stages() -> tuple[Callable, Callable]:
    """``chunk_head`` and ``chunk_tail`` under ``torch.compile(fullgraph=True)``.

    Compiled once per process; dynamic shapes, so the short last chunk of a call does
    not recompile. Sampling stays outside: the draws must come from the caller's seeded
    ``Generator`` (``sample_tokens``), which a traced graph would not consume alike.
    """
    if not _COMPILED:
        _COMPILED["head"] = torch.compile(chunk_head, fullgraph=True, dynamic=True)
        _COMPILED["tail"] = torch.compile(chunk_tail, fullgraph=True, dynamic=True)
    return _COMPILED["head"], _COMPILED["tail"]


def weighted_nll_chunk(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None = None,
    need_grad: bool = True,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    check_finite: bool = True,
    compile: bool = False,
    transform: LogitTransform | None = None,
) -> ChunkResult:
    """Loss sum, logit gradient and statistics of one chunk.

    Args:
        z: [n, V] logits (not modified without a ``transform``), fp32 or the 16-bit
            compute dtype; the math is fp32.
        targets: [n] int64 target token ids (all valid).
        scale: [n] fp32 normalization weight of each position (e.g. 1 / tokens).
        objective: which weights to use.
        generator: RNG for the sampled estimator.
        need_grad: skip the gradient when only the value is wanted (evaluation).
        out: optional contiguous [n, V] fp32 tensor that receives the gradient (e.g. a
            slice of the caller's gradient of the whole batch), saving a copy.
        workspace: reusable scratch buffers; pass the same one for every chunk. Without
            ``out`` the returned gradient lives in it, valid until the next chunk.
        check_finite: raise on NaN/Inf logits here (reads a flag: free on CPU, a host
            sync on a GPU). With False the caller checks ``ChunkResult.finite`` once
            per loss call, and rows that are not finite get harmless sampling weights.
        compile: run the math through ``compiled_stages`` (fresh buffers, no ``out``).
        transform: ``z`` is the lm_head's output ``r``; it is turned into the model's
            logits in place (in its own dtype, as the model does), the loss, sampler and
            statistics read those, and the gradient is ``dl/dr`` (``transform.py``).
    """
    y = targets.unsqueeze(1)
    if z.dtype != torch.float32 and z.device.type == "cpu" and not compile:
        # CPU kernels cast a 16-bit input of a mixed-dtype op to an fp32 temporary in every
        # op (GPU kernels cast in registers): one cast into a reused buffer instead.
        ws_up = workspace if workspace is not None else Workspace()
        z = ws_up.take("logits_fp32", z).copy_(z)
        workspace = ws_up
    if transform is not None and not transform.is_identity:
        z = transform.apply_(z)
    else:
        transform = None
    if compile:
        head_fn, tail_fn = compiled_stages()
        ws = out = None
    else:
        head_fn, tail_fn = chunk_head, chunk_tail
        ws = workspace if workspace is not None else Workspace()
    head = head_fn(z, y, objective, out, ws)
    if check_finite and not bool(head.finite):
        raise nonfinite_error()
    draws = None
    if objective.kind == "otr" and objective.estimator == "sampled":
        n, k = z.shape[0], objective.num_samples
        # The CDF overwrites the rollout policy (the gradient does not need it), except at
        # kappa = 1, where the rollout policy is pi: then it goes to the free ``aux``.
        if ws is None:
            cdf = None
        elif head.rollout is head.pi:
            cdf = ws.take("aux", z)
        else:
            cdf = head.rollout
        uniforms = ws.take_shape("uniforms", n, k, z.device) if ws is not None else None
        ids = ws.take_shape("draws", n, k, z.device, torch.int64) if ws is not None else None
        # NaN/Inf weights would make the search undefined before the caller's single check
        # could report them (check_finite False).
        draws = sample_tokens(
            head.rollout, k, generator, cdf=cdf, uniforms=uniforms, out=ids,
            sanitize=not check_finite,
        )  # fmt: skip
    loss, grad, stats = tail_fn(z, y, scale, objective, head, draws, need_grad, ws, transform)
    return ChunkResult(loss=loss, grad=grad, stats=stats, finite=head.finite)
