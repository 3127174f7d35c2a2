"""Evaluation under torch.distributed (gloo, CPU), launched by torchrun.

Usage: python -m torch.distributed.run --nproc_per_node N tests/eval_worker.py MODEL OUT
        EVAL_BATCH
For each normalization, every process runs ``trainer.evaluate()`` on the same 8 examples
(each process takes its share). Then rank 0 alone logs an ``eval_`` key, as Axolotl's
bench-evaluation callback does, while the other ranks wait (outside any collective) for
rank 0 to say it is done; a rank 0 stuck in a collective makes them give up with exit
code 3. Rank 0 saves the evaluation metrics to OUT, and its logs to OUT with the
suffix ``.logs.pt`` once every rank is past the log.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_setup import build_trainer, make_examples  # noqa: E402

from axolotl_otr.objective import Objective, OTRSettings  # noqa: E402

VOCAB = 512
WAIT_S = 45


def main() -> None:
    model, out, eval_batch = sys.argv[1:4]
    out = Path(out)
    done = out.parent / "rank0_logged"
    metrics = {}
    for normalization in ("token", "sequence"):
        trainer, _, logs = build_trainer(
            model, out.parent / f"trainer-{normalization}", make_examples(2, VOCAB),
            micro_batch=int(eval_batch), accumulation=1, ddp_timeout=120,
            eval_examples=make_examples(8, VOCAB, seed=1),
            settings=OTRSettings(Objective(estimator="exact"), normalization=normalization),
        )  # fmt: skip
        metrics[normalization] = trainer.evaluate()
    rank = trainer.args.process_index
    if rank == 0:  # saved before the rank-0-only log, so a hang there still leaves them
        torch.save({"metrics": metrics, "world": trainer.args.world_size}, out)
    if rank == 0:
        trainer.log({"eval_bench_loss": 0.5})
        done.touch()
    else:
        deadline = time.monotonic() + WAIT_S
        while not done.exists():
            if time.monotonic() > deadline:
                print(f"rank {rank}: rank 0 did not return from log() in {WAIT_S} s")
                sys.exit(3)
            time.sleep(0.2)
    trainer.accelerator.wait_for_everyone()
    if rank == 0:
        torch.save({"logs": logs.logs}, out.with_suffix(".logs.pt"))


if __name__ == "__main__":
    main()
