"""How the loss of one micro-batch is scaled so that gradients add up to the window's.

The Trainer puts the OTR loss in its ``compute_loss_func`` slot and treats it as it
treats cross-entropy: it hands over the window's unit count (``num_items_in_batch``),
divides by the accumulation steps only when there is none, and multiplies by the number
of data-parallel processes when the count was taken across devices (DDP then averages
gradients). This module holds that arithmetic for the terms the Trainer does not count:
a loss that is its own micro-batch mean, and the model's router (MoE) term.
"""

from __future__ import annotations

from typing import Any

import torch


def global_count(num_items_in_batch: Any) -> Any:
    """The window's unit count. Under DataParallel the Trainer repeats the scalar once per
    GPU ([n_gpu, 1], for the replicas' own losses); every entry is the same total."""
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() > 1:
        return num_items_in_batch.reshape(-1)[0]
    return num_items_in_batch


def world_factor(
    num_items_in_batch: Any,
    *,
    average_tokens_across_devices: bool,
    n_gpu: int,
    num_processes: int,
    tp_size: int = 1,
) -> int:
    """The factor the Trainer multiplies a ``compute_loss_func`` loss by (token counts
    across devices; transformers 5.x does it in evaluation too): the data-parallel
    degree, 1 when the count was not taken across devices."""
    if not (average_tokens_across_devices and num_items_in_batch is not None):
        return 1
    if n_gpu > 1:
        return n_gpu
    return max(max(num_processes, 1) // max(tp_size, 1), 1)


def window_loss(
    loss: torch.Tensor, *, counted: bool, steps: int, world: int, n_gpu: int
) -> torch.Tensor:
    """The micro-batch's share of the window's loss.

    ``counted``: ``loss`` is a sum divided by the window's unit count, already a share.
    Otherwise it is this micro-batch's own mean: average it over the window's ``steps``
    and undo the Trainer's ``world`` factor (a local mean is not a share of a global
    sum). Under DataParallel (``n_gpu`` > 1) a counted loss already covers the gathered
    batch of all GPUs, so the factor is undone too.
    """
    if not counted:
        return loss / (steps * world)
    if n_gpu > 1:
        return loss / world
    return loss


def auxiliary_loss(aux: torch.Tensor, *, steps: int, world: int) -> torch.Tensor:
    """The model's router term as its own loss adds it: DataParallel gathers one value per
    replica (their mean is the model's), a per-micro-batch mean over the window, divided
    by the Trainer's factor so that after DDP's mean it is the mean of the processes'."""
    return aux.mean() / (steps * world)
