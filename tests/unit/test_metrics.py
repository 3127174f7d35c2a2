"""The metrics accumulator under several processes: every process enters every collective.

A process with nothing to report for a phase (an empty evaluation shard) must still take
part in the all-reduce, or the processes disagree on the collectives and hang.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os

import pytest
import torch

from axolotl_otr.metrics import StatsAccumulator

WORLD = 2


def _worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=20),
    )
    try:

        def reduce(stats: torch.Tensor) -> torch.Tensor:
            stats = stats.clone()
            dist.all_reduce(stats)
            return stats

        accumulator = StatsAccumulator()
        if rank == 0:  # rank 1 saw no evaluation batch at all
            accumulator.add("eval", torch.tensor([4.0, 8.0, 2.0, 1.0, 6.0, 3.0]))
        metrics = accumulator.pop_metrics("eval", "eval_", reduce)
        # A second collective: it pairs with the first one on the other rank if a rank
        # skipped its all-reduce, and then fails or times out instead of passing.
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, metrics)
        results.put((rank, metrics, everyone))
    finally:
        dist.destroy_process_group()


def test_a_process_without_statistics_still_joins_the_all_reduce(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=_worker, args=(r, init_file, results)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        os.kill(proc.pid, 9)
    assert not alive, "a process hung in a collective"
    assert [proc.exitcode for proc in procs] == [0, 0]
    got = dict(
        (rank, (metrics, everyone))
        for rank, metrics, everyone in (results.get(timeout=5) for _ in range(WORLD))
    )
    for rank in range(WORLD):
        metrics, everyone = got[rank]
        assert metrics["eval_otr/ce"] == pytest.approx(2.0)  # 8 / 4 tokens, on every rank
        assert everyone[0] == everyone[1]


def test_nothing_to_report_anywhere_gives_no_metrics():
    calls = []

    def reduce(stats):
        calls.append(stats)
        return stats

    assert StatsAccumulator().pop_metrics("train", "", reduce) == {}
    assert len(calls) == 1  # the collective is entered even with nothing to report
