"""The sampler's per-step streams and the seed that travels with checkpoints
(``trainer/sampler.py``), without a Trainer."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from axolotl_otr.trainer.sampler import OTRSamplerState, StepSampler, stream_seed


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=generator)


def test_a_stream_depends_on_seed_rank_phase_and_step_only():
    key = (0, 0, "train", 3)
    assert stream_seed(*key) == stream_seed(*key)
    others = {stream_seed(1, 0, "train", 3), stream_seed(0, 1, "train", 3)}
    others |= {stream_seed(0, 0, "eval", 3), stream_seed(0, 0, "train", 4)}
    assert stream_seed(*key) not in others and len(others) == 4
    assert 0 <= stream_seed(*key) < 2**63


def test_a_step_continues_its_stream_and_a_new_step_restarts_from_its_seed():
    sampler = StepSampler(seed=5, rank=0)
    first = draws(sampler.generator("cpu", "train", 0))
    second = draws(sampler.generator("cpu", "train", 0))  # same step: the stream goes on
    assert not torch.equal(first, second)
    fresh = StepSampler(seed=5, rank=0)  # a resumed run at step 0 repeats both
    assert torch.equal(draws(fresh.generator("cpu", "train", 0)), first)
    assert torch.equal(draws(fresh.generator("cpu", "train", 0)), second)
    # evaluation in between does not shift the training stream of the next step
    sampler.generator("cpu", "eval", 0)
    resumed = StepSampler(seed=5, rank=0)
    assert torch.equal(
        draws(sampler.generator("cpu", "train", 1)), draws(resumed.generator("cpu", "train", 1))
    )


def state_with(saved, step: int) -> SimpleNamespace:
    return SimpleNamespace(stateful_callbacks=saved, global_step=step)


def test_a_resume_from_another_seed_warns_and_the_same_seed_does_not(caplog):
    callback = OTRSamplerState(seed=1)
    same = {"OTRSamplerState": callback.state()}
    other = {"OTRSamplerState": [OTRSamplerState(seed=2).state()]}  # the Trainer's list form
    with caplog.at_level(logging.WARNING, logger="axolotl.otr"):
        callback.on_train_begin(None, state_with(same, 10), None)
        assert not caplog.records
        callback.on_train_begin(None, state_with(other, 0), None)  # a fresh run: no check
        assert not caplog.records
        callback.on_train_begin(None, state_with(other, 10), None)
    assert len(caplog.records) == 1 and "'seed': 2" in caplog.records[0].getMessage()
