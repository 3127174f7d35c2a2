"""Which engine shards the lm_head, and what the sharded path does without processes
(``model/sharding.py``; the real engines run in ``tests/distributed/test_engines.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from axolotl_otr.model.loss_path import choose_loss_path
from axolotl_otr.model.sharding import FSDP1, FSDP2, ZERO3, ShardedHead, sharding_engine
from tests.unit.test_loss_path import Accelerator, tiny_llama


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


def fsdp2_trainer(model) -> SimpleNamespace:
    """A trainer-like object under FSDP2 (``sharding_engine``, ``choose_loss_path``)."""
    t = trainer(fsdp_version=2)
    t.accelerator = Accelerator()
    t.accelerator.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))
    t.model, t.args = model, SimpleNamespace(n_gpu=0)
    return t


def test_fsdp1_has_no_sharded_path():
    with pytest.raises(ValueError, match="FSDP1"):
        ShardedHead(FSDP1, nn.Linear(4, 8))


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group and its CPU mesh: enough for FSDP2's fully_shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def frozen_llama_under_fsdp2(mesh):
    """The tiny Llama, frozen (the head as under LoRA), wrapped by FSDP2 like accelerate's
    transformer auto-wrap: each decoder layer, then the root (which owns the head)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    model.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_fsdp2_a_model_already_wrapped_takes_the_measured_fused_path(one_process_group):
    """The exactness check reads the head before its forward: the unit that owns it is
    unsharded for the probe (else: mixed Tensor and DTensor, the logits path), and
    resharded after it."""
    from torch.distributed.tensor import DTensor

    model = frozen_llama_under_fsdp2(one_process_group)
    path = choose_loss_path(fsdp2_trainer(model), fused=True)
    assert path.fused, path.describe()
    assert isinstance(model.lm_head.weight, DTensor)  # resharded after the probe


def test_fsdp2_the_head_is_whole_at_loss_time_and_freed_after_an_eval_loss(
    one_process_group,
):
    """Not wrapped when OTR attaches: no unit yet. Wrapped by the next forward: found then,
    the head a plain tensor after the forward (no second gather for the loss), and
    sharded again when an evaluation loss (no backward to come) returns."""
    from torch.distributed.tensor import DTensor

    plain = tiny_llama()
    sharded = ShardedHead(FSDP2, plain.lm_head)
    sharded.before_forward(plain)
    assert sharded.unit is None
    model = frozen_llama_under_fsdp2(one_process_group)
    sharded = ShardedHead(FSDP2, model.lm_head)
    sharded.before_forward(model)
    assert sharded.unit is model
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        model(input_ids=ids)
        with sharded.full():
            assert not isinstance(model.lm_head.weight, DTensor)
    assert isinstance(model.lm_head.weight, DTensor)
