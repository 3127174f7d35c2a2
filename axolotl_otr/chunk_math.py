"""Per-chunk math: loss, closed-form logit gradient and metrics of a weighted NLL.

Every objective this package offers is a weighted negative log-likelihood
``l_t = -sum_a w_a log pi(a)`` with ``w`` detached (see ``shared/OTR.md``):

- sft: ``w = one_hot(y)``
- dft: ``w = sg(pi(y)) * one_hot(y)``
- otr, exact: ``w = (1 - beta) * pi'(y) * one_hot(y) + beta * pi'``
- otr, sampled: ``w = (1 - beta) * hits / K * one_hot(y) + beta * counts / K``

so its logit gradient is ``(sum_a w_a) * pi - w``. This module computes the loss and
that gradient for one chunk of positions in a single pass, on fp32 logits, without ever
building anything of shape [positions, K, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import Objective

# Order of the per-chunk statistics vector (sums over positions, unscaled).
STAT_NAMES = ("tokens", "ce", "p_target", "hit_rate", "entropy")


@dataclass
class ChunkResult:
    """What one chunk contributes: the scaled loss sum, its gradient and statistics."""

    loss: torch.Tensor  # scalar, sum_t scale_t * l_t
    grad: torch.Tensor | None  # [n, V] fp32, scale_t * dl_t/dz_t
    stats: torch.Tensor  # [len(STAT_NAMES)] fp32 sums


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [n, V] tensors without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def sample_tokens(
    probs: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """[n, K] token ids drawn with replacement from each row of ``probs`` [n, V]."""
    return torch.multinomial(probs, num_samples, replacement=True, generator=generator)


def _softmax_from_max(z: torch.Tensor, row_max: torch.Tensor, temperature: float):
    """softmax(z / temperature) and its log-normalizer, reusing the rows' max of z."""
    if temperature == 1.0:
        probs = torch.sub(z, row_max)
    else:
        probs = torch.mul(z, 1.0 / temperature)
        probs.sub_(row_max / temperature)
    probs.exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return probs, total.log_().add_(row_max / temperature)


def weighted_nll_chunk(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None = None,
    need_grad: bool = True,
) -> ChunkResult:
    """Loss sum, logit gradient and statistics of one chunk.

    Args:
        z: [n, V] fp32 logits (not modified).
        targets: [n] int64 target token ids (all valid).
        scale: [n] fp32 normalization weight of each position (e.g. 1 / tokens).
        objective: which weights to use.
        generator: RNG for the sampled estimator.
        need_grad: skip the gradient when only the value is wanted (evaluation).
    """
    y = targets.unsqueeze(1)
    row_max = z.amax(-1, keepdim=True)
    if not torch.isfinite(row_max).all():
        raise FloatingPointError(
            "OTR loss: the logits contain NaN or Inf; the model's forward pass diverged "
            "(check the learning rate, the data, or fp16 overflow)."
        )
    pi, lse = _softmax_from_max(z, row_max, 1.0)
    logp_y = z.gather(1, y).sub_(lse).view(-1)
    p_y = logp_y.exp()
    entropy = lse.view(-1) - rowdot(pi, z)

    dense_beta = None  # rollout probabilities that enter w with weight beta (exact OTR)
    draws = None
    if objective.objective == "sft":
        target_weight = torch.ones_like(p_y)
        total_weight = target_weight
        loss_t = -logp_y
        hit = p_y
    elif objective.objective == "dft":
        target_weight = p_y
        total_weight = p_y
        loss_t = -p_y * logp_y
        hit = p_y
    else:
        beta = objective.beta
        if objective.temperature == 1.0:
            rollout = pi
        else:
            rollout, _ = _softmax_from_max(z, row_max, objective.temperature)
        if objective.estimator == "exact":
            hit = rollout.gather(1, y).view(-1)
            target_weight = (1.0 - beta) * hit
            total_weight = beta + target_weight
            mean_logp = rowdot(rollout, z) - lse.view(-1)  # E_{pi'}[log pi]
            loss_t = -(beta * mean_logp + target_weight * logp_y)
            dense_beta = rollout
        else:
            k = objective.num_samples
            draws = sample_tokens(rollout, k, generator)
            hit = (draws == y).sum(1).to(z.dtype) / k
            target_weight = (1.0 - beta) * hit
            total_weight = beta + target_weight
            mean_logp = z.gather(1, draws).mean(1) - lse.view(-1)  # mean_k log pi(a_k)
            loss_t = -(beta * mean_logp + target_weight * logp_y)
        del rollout

    stats = torch.stack(
        [
            torch.tensor(float(z.shape[0]), device=z.device),
            (-logp_y).sum(),
            p_y.sum(),
            hit.sum(),
            entropy.sum(),
        ]
    )
    loss = (loss_t * scale).sum()
    if not need_grad:
        return ChunkResult(loss=loss, grad=None, stats=stats)

    # grad = scale * (total_weight * pi - w), built in place in pi's buffer.
    grad = pi
    if dense_beta is pi:  # kappa == 1: the beta * pi' term folds into the pi term
        grad.mul_(((total_weight - objective.beta) * scale).unsqueeze(1))
    else:
        grad.mul_((total_weight * scale).unsqueeze(1))
        if dense_beta is not None:
            grad.sub_(dense_beta.mul_((objective.beta * scale).unsqueeze(1)))
    grad.scatter_add_(1, y, (-target_weight * scale).unsqueeze(1))
    if draws is not None:
        per_draw = (-objective.beta / objective.num_samples) * scale
        grad.scatter_add_(1, draws, per_draw.unsqueeze(1).expand_as(draws))
    return ChunkResult(loss=loss, grad=grad, stats=stats)
