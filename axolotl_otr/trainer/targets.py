"""Whether a dataset holds any target token, read before the first step.

A set whose labels are all ``-100`` (empty outputs, ``train_on_inputs: false`` with a
template that masks every turn, ``roles_to_train`` that match no role) trains at loss 0
and gradient 0 and saves an adapter equal to the base model. Axolotl drops such rows
only with ``sample_packing`` (then it raises its own error when none is left); without
packing nothing warns. OTR reads the labels ahead and refuses the run instead.

A target is a label other than ``-100`` at a position after the first one (the Trainer's
causal loss shifts labels: nothing predicts a row's first token). The read stops at the
first target found, so a healthy set costs one batch; a set without any is read through
once. A dataset that cannot be read ahead (streaming, iterable) is not checked here; the
per-window rule of ``run_guard.py`` still applies to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
_BATCH = 1024  # rows read at a time from an Arrow-backed dataset

LIKELY_CAUSES = (
    "the outputs are empty; train_on_inputs: false with a prompt template that masks "
    "every turn; roles_to_train (or train_on_eos) matching no role of the chat template; "
    "sequence_len cutting every output off. Check one sample with "
    "`axolotl preprocess <config> --debug`"
)


def has_targets(dataset: Any) -> bool | None:
    """True if some row of ``dataset`` has a target token, False if none does, None if
    it cannot be read ahead (no length, or no ``labels``)."""
    iter_batches = getattr(dataset, "with_format", None)
    if callable(iter_batches) and "labels" in (getattr(dataset, "column_names", None) or ()):
        # A Hugging Face Dataset: Arrow batches of the rows it holds (its own indices).
        batches = dataset.with_format("arrow").iter(batch_size=_BATCH)
        return any(_arrow_batch_has_targets(batch.column("labels")) for batch in batches)
    if not isinstance(dataset, Sequence) and not hasattr(dataset, "__len__"):
        return None
    try:
        rows = (dataset[i] for i in range(len(dataset)))
        return any(_row_has_targets(row["labels"]) for row in rows)
    except (KeyError, TypeError, IndexError):
        return None


def no_targets_message(which: str) -> str:
    """The refusal for a set without targets, naming the likely causes."""
    return (
        f"OTR: the {which} set has no target tokens (every label is -100), so there is "
        f"nothing to train on or to measure. Likely causes: {LIKELY_CAUSES}."
    )


def _row_has_targets(labels: Iterable[int]) -> bool:
    values = np.asarray(labels if not hasattr(labels, "tolist") else labels.tolist())
    return bool((values.reshape(-1)[1:] != IGNORE_INDEX).any())


def _arrow_batch_has_targets(column: Any) -> bool:
    """Any label other than -100 after each row's first position, in one Arrow column."""
    for chunk in getattr(column, "chunks", [column]):
        lengths = chunk.value_lengths().to_numpy(zero_copy_only=False)
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        targets = values != IGNORE_INDEX
        lengths = np.nan_to_num(lengths, nan=0).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        targets[starts[lengths > 0]] = False  # a row's first label is never predicted
        if targets.any():
            return True
    return False
