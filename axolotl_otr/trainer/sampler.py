"""The seeded token sampler of the ``sampled`` estimator, and how it survives a resume.

Every optimizer step draws from a fresh stream derived from (seed, process rank, phase,
global step). A resumed run therefore repeats the uninterrupted run's draws exactly,
on every process, with nothing but the step counter the Trainer already checkpoints;
no per-rank state files, and evaluation never shifts the training stream.

The seed itself travels with each checkpoint through the Trainer's stateful-callback
mechanism (``transformers.trainer_callback.ExportableState``, saved in
``trainer_state.json``). ``TrainingArguments.restore_callback_states_from_checkpoint``
defaults to False, so the callback does not rely on being rebuilt from that state: in
``on_train_begin`` it reads ``state.stateful_callbacks`` (which the Trainer has loaded
from the checkpoint by then) and warns when the checkpoint was drawn with another seed,
since the resumed run would then not repeat the interrupted one.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

LOG = logging.getLogger("axolotl.otr")

# Bump when the derivation of the streams changes: older checkpoints then get a warning.
STREAM_SCHEME = "sha256(seed:rank:phase:step)/v1"


def stream_seed(seed: int, rank: int, phase: str, step: int) -> int:
    """A 63-bit seed for one (process, phase, step): independent streams, no collisions."""
    digest = hashlib.sha256(f"{seed}:{rank}:{phase}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepSampler:
    """One ``torch.Generator`` per process, re-seeded when the (phase, step) changes."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed = seed
        self.rank = rank
        self._generator: torch.Generator | None = None
        self._key: tuple[str, int, torch.device] | None = None

    def generator(self, device: torch.device, phase: str, step: int) -> torch.Generator:
        key = (phase, step, torch.device(device))
        if self._generator is None or self._key != key:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(stream_seed(self.seed, self.rank, phase, step))
            self._key = key
        return self._generator


class OTRSamplerState(TrainerCallback, ExportableState):
    """Saves the sampler's seed with every checkpoint; checks it when a run resumes."""

    def __init__(self, seed: int, scheme: str = STREAM_SCHEME) -> None:
        self.seed = seed
        self.scheme = scheme

    def state(self) -> dict:
        return {"args": {"seed": self.seed, "scheme": self.scheme}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if not saved or state.global_step == 0:
            return
        saved_args = saved.get("args", {})
        if saved_args != self.state()["args"]:
            LOG.warning(
                "OTR: the checkpoint's tokens were drawn with %s, this run draws with %s; "
                "the resumed run will not repeat the interrupted run's samples",
                saved_args,
                self.state()["args"],
            )
