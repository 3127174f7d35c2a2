"""The OTR metrics: their names (defined here only), and their sums between two logs.

OTR loss values are not cross-entropy values; users judge a run by the plain CE, the
mean probability of the target, the hit rate of the K samples and the entropy of the
policy on the same tokens, so those are logged next to the loss (``docs/algorithm.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .kernels.chunk_math import STAT_NAMES

PREFIX = "otr/"
# statistic (a name in STAT_NAMES) -> logged key; the perplexity is exp of the mean CE.
METRIC_KEYS = {
    "ce": PREFIX + "ce",
    "p_target": PREFIX + "p_target",
    "hit_rate": PREFIX + "hit_rate",
    "entropy": PREFIX + "entropy",
}
PPL_KEY = PREFIX + "ppl"
LOGGED_KEYS = (*METRIC_KEYS.values(), PPL_KEY)
# The base model's token-level measures on the fine-tuning data, from the window of the
# first optimizer step (before any update), logged once at the first training log: what
# the map of measured runs is indexed by (``map_reading.py``).
FIRST_WINDOW = "first_window"
FIRST_WINDOW_KEYS = {
    "p_target": PREFIX + "first_window_p_target",
    "argmax_share": PREFIX + "first_window_argmax_share",
}


def stats_to_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Means per target token from the summed statistics of any number of batches."""
    values = stats.detach().double().cpu().tolist()
    tokens = values[0]
    metrics = {"tokens": tokens}
    for name, total in zip(STAT_NAMES[1:], values[1:], strict=True):
        metrics[name] = total / tokens if tokens else float("nan")
    return metrics


class StatsAccumulator:
    """Sums of the statistics vector, one per phase (``train`` / ``eval``)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, phase: str, stats: torch.Tensor) -> None:
        stats = stats.detach()
        current = self._sums.get(phase)
        self._sums[phase] = stats.clone() if current is None else current + stats

    def discard(self, phase: str) -> None:
        """Forget ``phase``'s sums (local only: no collective)."""
        self._sums.pop(phase, None)

    def pop_means(
        self, phase: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Means per target token since the last pop (summed over processes by ``reduce``,
        ``tokens`` their count), then reset.

        ``reduce`` is a collective: it is called on every process, also by one that has
        nothing to report (it contributes zeros), so all processes enter it together.
        """
        stats = self._sums.pop(phase, None)
        if stats is None:
            stats = torch.zeros(len(STAT_NAMES), dtype=torch.float32)
        if reduce is not None:
            stats = reduce(stats)
        return stats_to_metrics(stats)

    def pop_metrics(
        self,
        phase: str,
        prefix: str = "",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """The logged metrics (``METRIC_KEYS``, ``PPL_KEY``) of ``pop_means``; none without
        a target token."""
        means = self.pop_means(phase, reduce)
        if not means["tokens"]:
            return {}
        logs = {prefix + key: round(means[name], 6) for name, key in METRIC_KEYS.items()}
        logs[prefix + PPL_KEY] = round(math.exp(min(means["ce"], 700.0)), 4)
        return logs
