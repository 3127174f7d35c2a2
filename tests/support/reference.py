"""Plain, obviously-correct reference implementations the tests compare against.

Written straight from docs/algorithm.md with full [tokens, vocab] tensors and autograd, no
chunking and no closed-form gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Flattened (logits, targets) of the scored positions, in row-major order."""
    vocab = logits.shape[-1]
    z = logits[:, :-1].reshape(-1, vocab)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    return z[keep], y[keep]


def per_token_loss(
    z, y, *, objective="otr", estimator="exact", beta=-0.1, kappa=1.3, draws=None, sft_mix=0.0
):
    logp = F.log_softmax(z.float(), dim=-1)
    logp_y = logp.gather(1, y[:, None])[:, 0]
    if sft_mix:  # lambda * cross-entropy + (1 - lambda) * OTR
        otr = per_token_loss(z, y, estimator=estimator, beta=beta, kappa=kappa, draws=draws)
        return sft_mix * -logp_y + (1 - sft_mix) * otr
    if objective == "sft":
        return -logp_y
    if objective == "dft":
        return -logp_y.exp().detach() * logp_y
    if estimator == "exact":
        rollout = F.softmax(z.detach().float() / kappa, dim=-1)
        reward = torch.full_like(rollout, beta)
        reward.scatter_(1, y[:, None], 1.0)
        return -(rollout * reward * logp).sum(-1)
    reward = torch.where(draws == y[:, None], 1.0, beta)
    return -(reward * logp.gather(1, draws)).mean(-1)


def reference_loss(logits, labels, num_items=None, **kwargs):
    z, y = shifted(logits, labels)
    losses = per_token_loss(z, y, **kwargs)
    return losses.sum() / (num_items if num_items is not None else max(len(y), 1))


def hidden_reference(hidden, weight, labels, estimator: str, draws=None):
    """The plain loss of ``hidden @ weight.T``; ``draws``: the sampled estimator's tokens."""
    logits = hidden @ weight.T
    if estimator == "exact":
        return reference_loss(logits, labels, estimator="exact")
    z, y = shifted(logits, labels)
    return per_token_loss(z, y, estimator="sampled", draws=torch.cat(draws)).mean()


def loss_on_path(path: str, hidden, weight, labels, **kwargs):
    """The package's loss on ``path``: "hidden" (fused with the head) or "logits"."""
    from axolotl_otr import otr_loss, otr_loss_from_hidden

    if path == "hidden":
        return otr_loss_from_hidden(hidden, weight, labels, **kwargs)
    return otr_loss(hidden @ weight.T, labels, **kwargs)
