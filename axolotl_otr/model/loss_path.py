"""Which path the loss takes for a trainer's model: chunked from hidden states, or logits.

Decided once, when OTR attaches. The hidden-state path needs a plain lm_head
(``output_layer.py``) that the engine does not shard outside the forward pass, the
decoder whose output it captures (``capture.py``), and logits that the exactness check
measures to be ``T(h W^T + b)`` (``exactness.py``). Every process must take the same
path, or they would differ in memory and speed: one gather at attach settles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import find_decoder
from .exactness import verify_output_layer
from .output_layer import OutputLayer, choose_output_layer


@dataclass(frozen=True)
class LossPath:
    """The lm_head accessor (``layer.weight_and_bias`` None: the logits path, with
    ``layer.reason``) and the decoder whose final hidden state the fused path reads."""

    layer: OutputLayer
    decoder: nn.Module | None

    @property
    def fused(self) -> bool:
        return self.layer.weight_and_bias is not None

    def describe(self) -> str:
        if self.fused:
            return f"chunked from hidden states ({self.layer.transform.describe()})"
        return f"from full logits ({self.layer.reason})"


def choose_loss_path(trainer: Any, fused: bool) -> LossPath:
    """The path for ``trainer.model`` under ``trainer``'s engine, agreed by every process.

    ``trainer`` is a ``transformers.Trainer`` (duck-typed: ``model``, ``args.n_gpu``,
    ``accelerator``, and the engine flags ``output_layer.choose_output_layer`` reads).
    """
    layer = choose_output_layer(trainer, fused)
    decoder = find_decoder(trainer.model)
    if layer.weight_and_bias is not None:
        if trainer.args.n_gpu > 1:
            layer = OutputLayer(None, "DataParallel replicates the model in every forward pass")
        elif decoder is None:
            layer = OutputLayer(None, "the model has no get_decoder()")
        else:  # measured on the model itself, once (exactness.py)
            with layer.probing(trainer.model):  # a sharded model made whole: sharding.py
                layer = verify_output_layer(trainer.model, layer, decoder)
    everywhere = fused_everywhere(trainer.accelerator, layer.weight_and_bias is not None)
    if layer.weight_and_bias is not None and not everywhere:
        layer = OutputLayer(
            None, "another process's exactness check chose the logits path; all follow it"
        )
    return LossPath(layer, decoder)


def fused_everywhere(accelerator: Any, fused_here: bool) -> bool:
    """Whether every process can take the fused path. The exactness check runs on each
    process alone; a result at its tolerance, or another GPU type, could split them.
    Every process attaches (the trainer is built on each), so this one gather meets them
    all; it runs on every process whatever its own answer."""
    if accelerator.num_processes <= 1:
        return fused_here
    device = accelerator.device
    here = torch.tensor([int(fused_here)], device=device)
    return bool(int(accelerator.gather(here).min()))  # once, at attach
