"""How a micro-batch's loss is scaled into its window (``scaling.py``), as plain arithmetic.

The property every rule serves: after the Trainer's factor and DDP's gradient mean, the
summed gradient of a window is that of one big batch (a counted loss), or the mean of the
micro-batches' own means (a loss with no window count, and the router term).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from axolotl_otr.scaling import (
    auxiliary_loss,
    count_across_processes,
    global_count,
    window_loss,
    world_factor,
)


def test_the_count_of_a_data_parallel_batch_is_its_first_entry():
    repeated = torch.tensor([[12], [12], [12]])
    assert int(global_count(repeated)) == 12
    scalar = torch.tensor(7)
    assert global_count(scalar) is scalar
    assert global_count(None) is None
    assert global_count(5) == 5


@pytest.mark.parametrize(
    ("averaged", "count", "n_gpu", "processes", "tp", "factor"),
    [
        (True, 10, 0, 4, 1, 4),  # DDP over 4 processes
        (True, 10, 0, 8, 2, 4),  # tensor parallel pairs share one data-parallel slot
        (True, 10, 3, 1, 1, 3),  # DataParallel in one process
        (True, None, 0, 4, 1, 1),  # no count: the Trainer applies no factor
        (False, 10, 0, 4, 1, 1),  # counted per device: no factor
        (True, 10, 0, 0, 1, 1),  # never below 1
    ],
)
def test_the_world_factor_is_the_trainers(averaged, count, n_gpu, processes, tp, factor):
    assert (
        world_factor(
            count,
            average_tokens_across_devices=averaged,
            n_gpu=n_gpu,
            num_processes=processes,
            tp_size=tp,
        )
        == factor
    )


def test_a_counted_loss_is_already_its_share():
    loss = torch.tensor(3.0)
    assert window_loss(loss, counted=True, steps=4, world=2, n_gpu=0) is loss


def test_a_local_mean_is_averaged_over_the_window_and_the_factor_undone():
    """Four micro-batch means, each multiplied by the Trainer's factor 2 and summed by
    accumulation, then averaged by DDP over 2 processes: the mean of the eight means."""
    means = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # [process, step]
    world, steps = 2, 4
    per_process = [
        sum(world * window_loss(m, counted=False, steps=steps, world=world, n_gpu=0) for m in row)
        for row in means
    ]
    ddp_mean = sum(per_process) / world
    torch.testing.assert_close(ddp_mean, means.mean())


def test_data_parallel_undoes_the_factor_of_a_counted_loss():
    """DataParallel's loss already covers the gathered batch of all GPUs."""
    loss = torch.tensor(6.0)
    assert float(window_loss(loss, counted=True, steps=1, world=3, n_gpu=3)) == 2.0


def test_the_router_term_is_the_mean_of_the_replicas_over_the_window():
    per_replica = torch.tensor([1.0, 3.0])  # DataParallel gathers one value per replica
    out = auxiliary_loss(per_replica, steps=4, world=2)
    assert float(out) == pytest.approx(2.0 / 8)


@pytest.mark.parametrize(
    ("averaged", "world_size", "n_gpu", "switched"),
    [
        (False, 2, 0, True),  # Axolotl's setting under torchrun: counted over processes
        (True, 2, 0, False),  # the Trainer's default: already counted
        (False, 1, 0, False),  # one process: nothing to count across
        (False, 1, 2, False),  # DataParallel in one process: refused or handled apart
    ],
)
def test_token_counts_are_taken_over_every_process(averaged, world_size, n_gpu, switched):
    args = SimpleNamespace(
        average_tokens_across_devices=averaged, world_size=world_size, n_gpu=n_gpu
    )
    line = count_across_processes(args)
    assert (line is not None) == switched
    assert args.average_tokens_across_devices == (averaged or switched)


@pytest.mark.parametrize(
    ("environment", "config", "split"),
    [
        ("2", None, 2),  # Axolotl's context_parallel_size: 2, passed to accelerate by env
        (None, SimpleNamespace(cp_size=2, sp_size=1), 2),  # the Trainer's own config
        (None, SimpleNamespace(cp_size=1, sp_size=2), 2),  # DeepSpeed sequence parallel
        (None, SimpleNamespace(cp_size=1, sp_size=1), 1),  # tensor parallel only: counted
    ],
)
def test_context_parallelism_leaves_the_count_per_process(environment, config, split, monkeypatch):
    """Processes sharing a sequence count its whole labels each (Axolotl slices them
    after the count): the switch stays off, with a line saying why."""
    monkeypatch.delenv("PARALLELISM_CONFIG_CP_SIZE", raising=False)
    if environment is not None:
        monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", environment)
    args = SimpleNamespace(
        average_tokens_across_devices=False, world_size=4, n_gpu=0, parallelism_config=config
    )
    line = count_across_processes(args)
    assert args.average_tokens_across_devices == (split == 1)
    assert ("left false" in line) == (split > 1), line
