"""Find a model's output projection as a differentiable (weight, bias) pair.

The chunked hidden-state path needs the lm_head as plain tensors. That is exact for a
``nn.Linear`` (tied or not), a PEFT LoRA-wrapped ``nn.Linear`` (the base weight plus the
active adapters' low-rank factors, kept apart so that ``W + B A`` is never formed) and a PEFT
``modules_to_save`` copy. Anything else (4-bit lm_head, DoRA, LoRA dropout on the
lm_head) is reported as unsupported, and the caller falls back to the model's own logits.

Whether the model's logits are then the lm_head's output, or a scaled or soft-capped map
of it, is not decided here by model type: ``exactness.verify_output_layer`` measures it
on the model when the trainer attaches OTR, and records it as ``OutputLayer.transform``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..kernels.transform import IDENTITY, LogitTransform
from .sharding import FSDP1, ShardedHead, sharding_engine


@dataclass
class OutputLayer:
    """A callable giving the lm_head's current (weight, bias), or why there is none, and
    the measured map from the lm_head's output to the model's logits."""

    weight_and_bias: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None
    reason: str = ""
    transform: LogitTransform = IDENTITY
    # Under FSDP2 / ZeRO-3: how the loss gets the whole head (sharding.py)
    sharded: ShardedHead | None = None

    def before_forward(self, model: nn.Module) -> None:
        """Called before a forward pass whose loss takes the hidden-state path."""
        if self.sharded is not None:
            self.sharded.before_forward(model)

    def probing(self, model: nn.Module) -> AbstractContextManager:
        """The block in which the exactness probe can run on ``model`` (sharding.py)."""
        return self.sharded.probing(model) if self.sharded is not None else nullcontext()

    def whole(self) -> AbstractContextManager:
        """The block in which ``weight_and_bias()`` gives the whole head: once per loss."""
        return self.sharded.full() if self.sharded is not None else nullcontext()


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_output_layer(model: nn.Module) -> OutputLayer:
    """How to get the (weight, bias) of ``model``'s lm_head, if it has a plain one
    (whether the logits are its output, or a transform of it, is measured later:
    ``exactness.verify_output_layer``)."""
    base = unwrap_peft(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return OutputLayer(None, f"{type(base).__name__}.forward has no logits_to_keep")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return OutputLayer(None, "the model has no output embeddings")
    return _layer_accessor(head)


def _layer_accessor(head: nn.Module) -> OutputLayer:
    if type(head) is nn.Linear:
        return OutputLayer(lambda: (head.weight, head.bias))
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        return _modules_to_save_accessor(head)
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):
        return _lora_accessor(head)
    return OutputLayer(None, f"unsupported lm_head type {type(head).__name__}")


def _modules_to_save_accessor(head: nn.Module) -> OutputLayer:
    def current() -> nn.Module:
        if head.disable_adapters or not head.active_adapters:
            return head.original_module
        return head.modules_to_save[head.active_adapters[0]]

    for module in [head.original_module, *head.modules_to_save.values()]:
        if type(module) is not nn.Linear:
            return OutputLayer(None, f"modules_to_save lm_head wraps {type(module).__name__}")
    return OutputLayer(lambda: (current().weight, current().bias))


def _lora_accessor(head: nn.Module) -> OutputLayer:
    base_layer = head.base_layer
    if type(base_layer) is not nn.Linear:
        return OutputLayer(None, f"LoRA lm_head over {type(base_layer).__name__}")
    for adapter in head.lora_A:
        if not isinstance(head.lora_dropout[adapter], nn.Identity):
            return OutputLayer(None, "LoRA dropout on the lm_head")
        if getattr(head, "use_dora", {}).get(adapter):
            return OutputLayer(None, "DoRA on the lm_head")

    for adapter in head.lora_B:
        if getattr(head.lora_B[adapter], "bias", None) is not None:
            return OutputLayer(None, "a LoRA bias on the lm_head")
    if getattr(head, "fan_in_fan_out", False):
        return OutputLayer(None, "fan_in_fan_out LoRA on the lm_head")

    def weight_and_bias() -> tuple:
        """(base weight, bias, (A, scaling * B)) of the active adapters, stacked along
        the rank: the loss adds ``(h A.T) B.T`` and never forms ``W + B A``."""
        weight, bias = base_layer.weight, base_layer.bias
        active = [] if head.disable_adapters or head.merged else head.active_adapters
        active = [a for a in active if a in head.lora_A]
        if not active:
            return weight, bias
        a = torch.cat([head.lora_A[name].weight for name in active], 0)
        b = torch.cat([head.lora_B[name].weight * head.scaling[name] for name in active], 1)
        return weight, bias, (a, b)

    return OutputLayer(weight_and_bias)


def choose_output_layer(trainer: Any, fused: bool) -> OutputLayer:
    """The hidden-state path's lm_head for this trainer, or why the logits path is used."""
    if not fused:
        return OutputLayer(None, "otr_fused is false")
    engine = sharding_engine(trainer)
    if engine == FSDP1:
        return OutputLayer(None, "FSDP (version 1) shards the lm_head outside the forward pass")
    layer = resolve_output_layer(trainer.model)
    if engine is None or layer.weight_and_bias is None:
        return layer
    head = unwrap_peft(trainer.model).get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):
        return OutputLayer(
            None,
            f"{engine} shards a trainable lm_head; its gradient is left to the engine's "
            "own hooks on the logits path",
        )
    return replace(layer, sharded=ShardedHead(engine, head))
