"""OTR in a Hugging Face ``Trainer``: the mixin with its public overrides (``mixin``), the
sampler's per-step streams and their checkpointed seed (``sampler``), the callbacks for
best-model selection and the loss watchdog (``training_choices``), the stops for runs that
train nothing or a dead model (``run_guard``, with the target count of ``targets``), and
the log without a perplexity of the OTR loss (``perplexity``)."""

from .mixin import OTRTrainerMixin, install_otr, with_otr

__all__ = ["OTRTrainerMixin", "install_otr", "with_otr"]
