"""The load-balancing (router) loss that mixture-of-experts models add to their own loss.

Mixtral, Qwen2-MoE, Qwen3-MoE and their relatives return ``aux_loss`` when
``output_router_logits`` is on and, given labels, add ``router_aux_loss_coef * aux_loss``
to the cross-entropy. OTR replaces the token loss only, so the trainer adds this term back,
exactly as the model would; otherwise the experts' load balancing silently stops.
"""

from __future__ import annotations

from typing import Any

import torch

from .output_layer import unwrap_peft


def router_loss(outputs: Any, model: torch.nn.Module) -> torch.Tensor | None:
    """``router_aux_loss_coef * aux_loss`` of these outputs, or None for a dense model."""
    aux = (
        outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
    )
    if aux is None:
        return None
    base = unwrap_peft(getattr(model, "module", model))
    coef = getattr(base, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(getattr(base, "config", None), "router_aux_loss_coef", None)
    if coef is None:
        raise ValueError(
            f"otr: {type(base).__name__} returned aux_loss but has no router_aux_loss_coef; "
            "cannot add its router loss the way the model does"
        )
    return coef * aux
