"""Reading a dataset's labels ahead (``trainer/targets.py``): what counts as a target."""

from __future__ import annotations

import torch
from datasets import Dataset, IterableDataset

from axolotl_otr.trainer.targets import has_targets, no_targets_message

EMPTY = [-100, -100, -100, -100]


def test_a_hugging_face_dataset_is_read_through_its_own_rows():
    rows = {"input_ids": [[1, 2, 3, 4]] * 3, "labels": [EMPTY, [-100, -100, 7, 2], EMPTY]}
    data = Dataset.from_dict(rows)
    assert has_targets(data) is True
    # A row's first label is never predicted (the causal loss shifts labels): no target.
    assert has_targets(Dataset.from_dict({"labels": [[5, -100, -100], EMPTY]})) is False
    # The rows a split or shuffle kept, not the table underneath.
    assert has_targets(data.select([0, 2])) is False
    assert has_targets(data.shuffle(seed=0).select(range(3))) is True


def test_a_list_of_examples_and_the_unreadable_cases():
    rows = [{"labels": torch.tensor(EMPTY)}, {"labels": torch.tensor([-100, 4, 2, -100])}]
    assert has_targets(rows) is True
    assert has_targets(rows[:1]) is False
    assert has_targets([{"input_ids": [1, 2]}]) is None  # labels made by the collator
    stream = IterableDataset.from_generator(lambda: iter([{"labels": EMPTY}]))
    assert has_targets(stream) is None


def test_the_message_names_the_set_and_the_likely_causes():
    message = no_targets_message("evaluation")
    assert message.startswith("OTR: the evaluation set has no target tokens")
    for cause in ("empty", "train_on_inputs", "roles_to_train", "sequence_len"):
        assert cause in message
