"""OTR in a Hugging Face ``Trainer``: the mixin with its public overrides (``mixin``), the
sampler's per-step streams and their checkpointed seed (``sampler``), and the callbacks
for best-model selection and the loss watchdog (``training_choices``)."""

from .mixin import OTRTrainerMixin, install_otr, with_otr

__all__ = ["OTRTrainerMixin", "install_otr", "with_otr"]
