"""Under OTR, no ``ppl`` / ``eval_ppl`` computed from the OTR loss reaches the logs.

Axolotl's trainer adds ``ppl = exp(loss)`` and ``eval_ppl = exp(eval_loss)`` to every
log. Under OTR the loss is the OTR objective (about -0.6 whatever the model does), so
that "perplexity" is about 0.54 and means nothing, next to the real one, ``otr/ppl``
(the exponential of the cross-entropy on the targets, ``metrics.py``).

Axolotl 0.21 has a switch for this, the trainer attribute ``reports_token_perplexity``
(its diffusion trainers turn it off). Axolotl 0.19 has none: its ``log`` writes the two
keys into the dict it is given, then hands that dict to the Trainer's ``log``, which
records and prints it. So the mixin's ``log`` turns the switch off and hands Axolotl a
dict that ignores writes of those two keys; everything else is logged unchanged.
"""

from __future__ import annotations

from typing import Any

LOSS_PERPLEXITY_KEYS = frozenset({"ppl", "eval_ppl"})


class LogsWithoutLossPerplexity(dict):
    """A log dict on which ``logs["ppl"] = ...`` and ``logs["eval_ppl"] = ...`` do nothing."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in LOSS_PERPLEXITY_KEYS:
            super().__setitem__(key, value)


def without_loss_perplexity(trainer: Any, logs: dict[str, float]) -> LogsWithoutLossPerplexity:
    """``logs`` for Axolotl's ``log`` under OTR: no perplexity of the OTR loss added."""
    trainer.reports_token_perplexity = False  # Axolotl 0.21+ reads it; 0.19 does not
    return LogsWithoutLossPerplexity(
        {key: value for key, value in logs.items() if key not in LOSS_PERPLEXITY_KEYS}
    )
