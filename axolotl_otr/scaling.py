"""How the loss of one micro-batch is scaled so that gradients add up to the window's.

The Trainer puts the OTR loss in its ``compute_loss_func`` slot and treats it as it
treats cross-entropy: it hands over the window's unit count (``num_items_in_batch``),
divides by the accumulation steps only when there is none, and multiplies by the number
of data-parallel processes when the count was taken across devices (DDP then averages
gradients). This module holds that arithmetic for the terms the Trainer does not count:
a loss that is its own micro-batch mean, and the model's router (MoE) term.
"""

from __future__ import annotations

import os
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


def sequence_split(args: Any) -> int:
    """How many processes share each sequence (context or sequence parallelism): the
    Trainer's ``parallelism_config`` (``cp_size`` x ``sp_size``), or Axolotl's
    ``context_parallel_size``, which reaches accelerate through the environment
    (``PARALLELISM_CONFIG_CP_SIZE``, axolotl/utils/trainer.py) and not the arguments."""
    config = getattr(args, "parallelism_config", None)
    split = (getattr(config, "cp_size", None) or 1) * (getattr(config, "sp_size", None) or 1)
    return max(split, int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE") or 1))


def count_across_processes(args: Any) -> str | None:
    """Have the Trainer count the window's target tokens over every process; returns the
    line to log when that changed the arguments, or when it was left off for context
    parallelism (None when there is nothing to say).

    ``otr_normalization: token`` promises the mean over the global batch's target tokens,
    so that N processes take the gradient of one process with the same global batch.
    The Trainer does that only with ``average_tokens_across_devices`` (its default):
    it gathers ``num_items_in_batch`` once per window and multiplies the loss by the
    process count, which DDP's, FSDP's and DeepSpeed's gradient mean divide out.
    Axolotl 0.19 and 0.21 set it to False for every run (core/builders/base.py), and
    each process would then take its own token mean. The switch is the Trainer's own
    documented argument, read at every window (``get_batch_samples``, ``compute_loss``),
    so turning it on when OTR attaches changes only how OTR's loss is normalized; the
    ``sequence`` normalization's count follows the same switch (``get_batch_samples``).
    One process alone (``world_size`` 1) and DataParallel in one process are left as
    they are. So is context / sequence parallelism (``sequence_split`` > 1): Axolotl
    slices the labels only in a pre-forward hook, after the Trainer counted them, so
    every process of a group would count the same whole sequences and the gathered
    count would be that many times too large.
    """
    if args.average_tokens_across_devices or args.world_size <= 1 or args.n_gpu > 1:
        return None
    split = sequence_split(args)
    if split > 1:
        return (
            f"otr: average_tokens_across_devices left false: {split} processes share each "
            "sequence (context parallelism), and their counts would repeat the same "
            "tokens; each process normalizes by its own target tokens"
        )
    args.average_tokens_across_devices = True
    return (
        f"otr: average_tokens_across_devices set to true ({args.world_size} processes): "
        "the loss is normalized by the target tokens (or sequences) of the global batch, "
        "as one process with the same global batch would be"
    )
