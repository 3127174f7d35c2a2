"""The map from the lm_head's output to the model's logits: scaling, then soft-capping.

Most causal LMs use the lm_head's output ``r = h W^T + b`` as their logits. Some apply
an elementwise map first: Cohere multiplies by ``logit_scale``, Granite divides by
``logits_scaling``, Gemma 2 soft-caps with ``c * tanh(r / c)``
(``final_logit_softcapping``). ``LogitTransform`` is the family those belong to,

    z = c * tanh(s * r / c)     (soft-capped, ``softcap = c``)
    z = s * r                   (``softcap`` None)

and the chunked loss applies it to each chunk's ``r`` before the softmax, so the loss,
its sampler and its metrics all see the model's own logits ``z``. Its derivative is
known in closed form from ``z`` itself, ``dz/dr = s * (1 - (z / c)^2)``, so the logit
gradient ``dl/dz`` of ``chunk_math`` becomes ``dl/dr`` with one elementwise product and
nothing saved. Which transform a model applies is measured on the model, not looked up
by name (``exactness.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(scale * r / softcap)`` (or ``scale * r`` without a cap)."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"logit scale must be a positive finite number, got {self.scale}")
        if self.softcap is not None and not (0 < self.softcap < float("inf")):
            raise ValueError(f"logit soft-cap must be positive and finite, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        """Whether the logits are the lm_head's output itself."""
        return self.scale == 1.0 and self.softcap is None

    def describe(self) -> str:
        """The transform as a formula, for the log line that names the chosen path."""
        if self.softcap is None:
            return "z = r" if self.scale == 1.0 else f"z = {self.scale:g} * r"
        inner = "r" if self.scale == 1.0 else f"{self.scale:g} * r"
        return f"z = {self.softcap:g} * tanh({inner} / {self.softcap:g})"

    def apply_(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` transformed in place (in its own dtype, as the model computes it)."""
        if self.softcap is None:
            return r if self.scale == 1.0 else r.mul_(self.scale)
        return r.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` transformed out of place (differentiable; for checks and references)."""
        if self.softcap is None:
            return r if self.scale == 1.0 else r * self.scale
        return torch.tanh(r * (self.scale / self.softcap)) * self.softcap


IDENTITY = LogitTransform()


def softcap_chain_(grad: torch.Tensor, z: torch.Tensor, softcap: float, scratch=None):
    """``grad *= 1 - (z / c)^2`` in place: ``d(c tanh(x / c))/dx`` read from the capped
    logits ``z`` (the scale factor ``s`` is applied by the caller, folded into the
    per-row weights). Two passes: ``z * z`` into ``scratch`` (fp32 [n, V], may be None),
    then ``grad - grad * z^2 / c^2``."""
    # The square in fp32 (z may be 16-bit on a GPU): copy, then square in place.
    square = scratch.copy_(z).square_() if scratch is not None else z.float().square()
    return grad.addcmul_(grad, square, value=-1.0 / (softcap * softcap))
