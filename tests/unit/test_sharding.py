"""Which engine shards the lm_head, and what the sharded path does without processes
(``model/sharding.py``; the real engines run in ``tests/distributed/test_engines.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from axolotl_otr.model.sharding import FSDP1, FSDP2, ZERO3, ShardedHead, sharding_engine


def trainer(fsdp_version=None, zero_stage=None) -> SimpleNamespace:
    state = SimpleNamespace(
        fsdp_plugin=None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version),
        deepspeed_plugin=None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage),
    )
    return SimpleNamespace(
        accelerator=SimpleNamespace(state=state),
        is_fsdp_enabled=fsdp_version is not None,
        is_deepspeed_enabled=zero_stage is not None,
    )


@pytest.mark.parametrize(
    ("setup", "engine"),
    [
        ({}, None),  # DDP or one process
        ({"fsdp_version": 1}, FSDP1),
        ({"fsdp_version": 2}, FSDP2),
        ({"zero_stage": 2}, None),  # ZeRO-1/2 keep every parameter whole
        ({"zero_stage": 3}, ZERO3),
    ],
)
def test_the_engine_that_shards_the_head(setup, engine):
    assert sharding_engine(trainer(**setup)) == engine


def test_fsdp1_has_no_sharded_path():
    with pytest.raises(ValueError, match="FSDP1"):
        ShardedHead(FSDP1, nn.Linear(4, 8))


def test_an_unwrapped_model_is_looked_up_again_at_the_next_forward():
    """OTR attaches before the Trainer wraps the model: no FSDP unit yet, nothing set."""
    head = nn.Linear(4, 8)
    sharded = ShardedHead(FSDP2, head)
    sharded.before_forward(nn.Sequential(nn.Linear(4, 4), head))
    assert sharded.unit is None
    with sharded.full():  # plain tensors: the loss runs, no gather is made
        assert head.weight.shape == (8, 4)
    assert sharded.gathers == 0


def test_zero3_gathers_once_per_loss_whatever_runs_inside():
    pytest.importorskip("deepspeed")
    head = nn.Linear(4, 8)
    sharded = ShardedHead(ZERO3, head)
    with sharded.full():
        for _ in range(5):  # chunks
            torch.mm(torch.ones(2, 4), head.weight.t())
    assert sharded.gathers == 1
