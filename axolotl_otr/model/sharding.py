"""The whole lm_head at loss time under an engine that shards it (FSDP2, DeepSpeed ZeRO-3).

The hidden-state path multiplies the final hidden states by the lm_head weight chunk by
chunk, after the model's forward pass. FSDP2 and ZeRO-3 keep only a shard of that weight
on each process outside a module's own forward, so the loss has to see the full weight,
in the engine's compute dtype, once per micro-batch (not once per chunk), and let go of
it when the loss is done. How, per engine (``docs/multi-gpu.md`` has the why):

- **FSDP2**: the FSDP unit that owns the lm_head (the root, under the usual transformer
  auto-wrap) is told not to reshard after its forward
  (``FSDPModule.set_reshard_after_forward(False, recurse=False)``, a public FSDP2 call,
  torch's own default for the root). The forward already gathered the head for the
  last position's logits, so the loss reads it as a plain tensor in the mixed-precision
  policy's ``param_dtype``, with no second gather; backward gathers the root anyway at its
  start and reshards it at its end. After an evaluation call (no backward to come) the
  unit is resharded at once (``FSDPModule.reshard()``).
- **ZeRO-3**: one ``deepspeed.zero.GatheredParameters`` around the whole loss of the
  micro-batch (read-only: ``modifier_rank=None``), in the parameters' own dtype, which is
  the engine's compute dtype; released when the loss returns. The fused loss computes
  its gradients in its forward, so its backward needs no second gather.

Only a frozen head takes this path (the usual LoRA / QLoRA set-up): a trainable one
would need its gradient routed to its shard through the engine's own gradient hooks,
which is not done here, so it keeps the logits path with that reason (``output_layer``).
FSDP1 keeps the logits path too (untested: no CPU run is possible).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

FSDP1, FSDP2, ZERO3 = "FSDP1", "FSDP2", "DeepSpeed ZeRO-3"


def sharding_engine(trainer: Any) -> str | None:
    """The engine that shards the lm_head outside the forward pass (``FSDP1``, ``FSDP2``,
    ``ZERO3``), or None when every process holds the whole head (DDP, ZeRO-1/2)."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(state, "fsdp_plugin", None)
        return FSDP2 if getattr(plugin, "fsdp_version", 1) == 2 else FSDP1
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return ZERO3
    return None


class ShardedHead:
    """Gives the loss the whole lm_head of one micro-batch under ``engine``.

    ``before_forward(model)`` before each forward pass whose loss takes the hidden-state
    path; ``with full():`` around the loss (ZeRO-3: one gather per loss; FSDP2: none,
    the forward's gather is reused; counted in ``tests/distributed/test_engines.py``).
    """

    def __init__(self, engine: str, head: nn.Module) -> None:
        if engine not in (FSDP2, ZERO3):
            raise ValueError(f"otr: no sharded hidden-state path under {engine}")
        self.engine = engine
        self.head = head
        self.unit: nn.Module | None = None  # FSDP2: the unit that owns the head

    def before_forward(self, model: nn.Module) -> None:
        """FSDP2: keep the head's unit unsharded after its forward (once; the engine wraps
        the model after OTR attaches, so the unit is looked up at the first forward)."""
        if self.engine != FSDP2 or self.unit is not None:
            return
        from torch.distributed.fsdp import FSDPModule

        owner = None
        for module in model.modules():  # depth first: the last match is the nearest
            if isinstance(module, FSDPModule) and any(m is self.head for m in module.modules()):
                owner = module
        if owner is not None:  # None: not wrapped (yet); the next forward looks again
            owner.set_reshard_after_forward(False, recurse=False)
            self.unit = owner

    @contextmanager
    def probing(self, model: nn.Module) -> Iterator[None]:
        """The block in which the exactness probe (one forward pass outside training, then
        the head's own product) can run on ``model`` as the engine left it at attach.

        ZeRO-3 may have partitioned the model when it was loaded (``zero.Init``: Axolotl's
        loader under a ZeRO-3 config, ``from_pretrained`` after the Trainer's arguments),
        before the engine wraps it with its gathering hooks. Here each module's own
        parameters are gathered for its forward and released after it, as the engine does,
        so only one layer and the head are whole at a time; the head stays whole for the
        block. FSDP2: a model already wrapped has the unit that owns its head unsharded
        before the probe (``FSDPModule.unshard()``: the probe reads the head before its
        forward), kept so through the forward (as for the loss) and resharded after it.
        Unpartitioned models: nothing to do.
        """
        if self.engine == FSDP2:
            self.before_forward(model)
            if self.unit is not None:  # the probe reads the head before the forward
                self.unit.unshard()
            try:
                yield
            finally:
                if self.unit is not None:
                    self.unit.reshard()
            return
        if not any(hasattr(p, "ds_id") for p in model.parameters()):
            yield
            return
        import deepspeed

        held: dict[nn.Module, Any] = {}

        def gather(module: nn.Module, args: Any) -> None:
            params = [p for p in module.parameters(recurse=False) if _partitioned(p)]
            if params:
                held[module] = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                held[module].__enter__()

        def release(module: nn.Module, args: Any, output: Any) -> None:
            context = held.pop(module, None)
            if context is not None:
                context.__exit__(None, None, None)

        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(gather))
            handles.append(module.register_forward_hook(release))
        head = [p for p in self.head.parameters() if hasattr(p, "ds_id")]
        try:
            with deepspeed.zero.GatheredParameters(head, modifier_rank=None):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for context in held.values():  # a forward that raised midway
                context.__exit__(None, None, None)

    @contextmanager
    def full(self) -> Iterator[None]:
        """The head's parameters are whole inside the block."""
        if self.engine == ZERO3:
            import deepspeed

            params = [p for p in self.head.parameters() if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
            return
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.head.parameters()):
            raise RuntimeError(
                "otr: the lm_head is still sharded when the loss runs (FSDP2): the unit "
                "that owns it was not found in the model the Trainer ran"
            )
        try:
            yield
        finally:
            if self.unit is not None and not torch.is_grad_enabled():
                self.unit.reshard()  # no backward follows: free the whole head now


def _partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose data is only this process's partition right now."""
    if not hasattr(param, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE
