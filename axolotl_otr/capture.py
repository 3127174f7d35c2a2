"""Take the final normed hidden state from inside the forward pass, and nothing else.

``output_hidden_states=True`` would make the model return every layer's hidden state, and
under ``bf16``/``fp16`` accelerate's ``convert_outputs_to_fp32`` copies each of them to
fp32 before the loss sees them: L + 1 fp32 [tokens, hidden] tensors where the chunked
loss needs one. A forward hook (``nn.Module.register_forward_hook``) on the causal LM's
decoder (``get_decoder()``, the module whose ``last_hidden_state`` the lm_head reads)
keeps a reference to that one tensor, in the dtype the model computed it in, and is
removed when the call ends. Hooks sit on the module object, so they fire the same inside
PEFT wrappers, DDP and gradient checkpointing (which recomputes the decoder layers, not
the decoder's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .output_layer import unwrap_peft


def find_decoder(model: nn.Module) -> nn.Module | None:
    """The module whose output's ``last_hidden_state`` feeds the lm_head, if it has one."""
    base = unwrap_peft(getattr(model, "module", model))
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not base else None


class FinalHidden:
    """The decoder's last hidden state of the one forward pass a ``capture`` spans."""

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None
        self._calls = 0
        self._taken = False

    def record(self, _module: nn.Module, _args, output) -> None:
        """The forward hook: keep the output's last hidden state."""
        self._calls += 1
        hidden = getattr(output, "last_hidden_state", None)
        self._value = hidden if hidden is not None else output[0]

    def take(self) -> torch.Tensor:
        """The captured tensor (once: the reference is dropped so it can be freed)."""
        if self._taken:
            raise RuntimeError("otr: the captured hidden state is handed out only once")
        if self._calls != 1 or self._value is None:
            raise RuntimeError(
                f"otr: expected one forward pass of the decoder inside compute_loss, saw "
                f"{self._calls}; this model or wrapper calls it differently, set "
                "otr_fused: false to use the model's logits"
            )
        value, self._value, self._taken = self._value, None, True
        return value


@contextmanager
def capture_final_hidden(decoder: nn.Module) -> Iterator[FinalHidden]:
    """Record ``decoder``'s output while the block runs; the hook is removed on exit."""
    holder = FinalHidden()
    handle = decoder.register_forward_hook(holder.record)
    try:
        yield holder
    finally:
        handle.remove()
        holder._value = None
