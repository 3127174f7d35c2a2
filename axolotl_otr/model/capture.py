"""Take the final normed hidden state from inside the forward pass, and nothing else.

``output_hidden_states=True`` would make the model return every layer's hidden state, and
under ``bf16``/``fp16`` accelerate's ``convert_outputs_to_fp32`` copies each of them to
fp32 before the loss sees them: L + 1 fp32 [tokens, hidden] tensors where the chunked
loss needs one. A forward hook (``nn.Module.register_forward_hook``) on the causal LM's
decoder (``get_decoder()``, the module whose ``last_hidden_state`` the lm_head reads)
keeps a reference to that one tensor, in the dtype the model computed it in. Hooks sit on
the module object, so they fire the same inside PEFT wrappers, DDP and gradient
checkpointing (which recomputes the decoder layers, not the decoder's output).

The hook is registered once per decoder, when OTR is attached, and records only while a
``capture_final_hidden`` block is open: ``torch.compile`` (``torch_compile: true``) does
not guard on a module's hooks, so a hook added after the first compiled forward of the
same call (a warm-up, a callback) would never run in the compiled code. Present from the
start, it is traced into the compiled graph, and its on/off flag is a guard (one
recompile when a capture first opens).

The hook also records whether the forward ran under autocast, and in which dtype:
accelerate's mixed precision wraps ``model.forward`` only, and the Trainer calls the loss
after it returns, so without this an fp32 lm_head (a full fine-tune without Axolotl's
casts) would have its chunk GEMMs run in fp32 where the model's own lm_head ran in
bf16/fp16 (``FinalHidden.autocast`` replays it around the loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from weakref import WeakKeyDictionary

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
        self._active = False  # recording only inside capture_final_hidden
        self._autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype)

    def record(self, _module: nn.Module, _args, output) -> None:
        """The forward hook: keep the output's last hidden state (while a capture is open)."""
        if not self._active:
            return
        self._calls += 1
        hidden = getattr(output, "last_hidden_state", None)
        self._value = hidden if hidden is not None else output[0]
        kind = self._value.device.type
        on = torch.is_autocast_enabled(kind)
        self._autocast = (kind, torch.get_autocast_dtype(kind)) if on else None

    def autocast(self) -> AbstractContextManager:
        """The autocast the recorded forward ran under (a no-op context if none), so the
        loss's GEMMs run in the dtype the model's own lm_head would have used."""
        if self._autocast is None:
            return nullcontext()
        kind, dtype = self._autocast
        return torch.autocast(kind, dtype=dtype)

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

    def _open(self) -> None:
        """Start recording a fresh capture (one at a time)."""
        if self._active:
            raise RuntimeError("otr: a capture of the final hidden state is already open")
        self._value, self._calls, self._taken, self._active = None, 0, False, True

    def _close(self) -> None:
        """Stop recording and drop the reference, so the tensor can be freed."""
        self._active, self._value = False, None


# One recorder (and one hook) per decoder, whichever trainer attached it; dropped with it.
_RECORDERS: WeakKeyDictionary[nn.Module, FinalHidden] = WeakKeyDictionary()


def final_hidden_recorder(decoder: nn.Module) -> FinalHidden:
    """``decoder``'s recorder, registering its one forward hook the first time.

    Called when OTR is attached, before any forward pass of the run, so the hook is part
    of the module when ``torch.compile`` first traces it (see the module docstring).
    """
    recorder = _RECORDERS.get(decoder)
    if recorder is None:
        recorder = FinalHidden()
        decoder.register_forward_hook(recorder.record)
        _RECORDERS[decoder] = recorder
    return recorder


@contextmanager
def capture_final_hidden(decoder: nn.Module) -> Iterator[FinalHidden]:
    """Record ``decoder``'s output while the block runs; the hook stays, inert, on exit."""
    holder = final_hidden_recorder(decoder)
    holder._open()
    try:
        yield holder
    finally:
        holder._close()
