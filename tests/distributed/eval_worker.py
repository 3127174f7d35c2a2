"""Evaluation under torch.distributed (gloo, CPU), launched by torchrun.

Usage: python -m torch.distributed.run --nproc_per_node N -m tests.distributed.eval_worker MODEL OUT
        EVAL_BATCH
For each normalization, every process runs ``trainer.evaluate()`` on the same 8 examples
(each process takes its share). Then rank 0 alone logs an ``eval_`` key, as Axolotl's
bench-evaluation callback does, while the other ranks wait (outside any collective) for
rank 0 to say it is done; a rank 0 stuck in a collective makes them give up with exit
code 3. Rank 0 saves the evaluation metrics to OUT, and its logs to OUT with the
suffix ``.logs.pt`` once every rank is past the log.

With a fourth argument ``one-rank`` it runs the one-rank check instead: for plain
cross-entropy (the control), OTR with token and OTR with sequence normalization, rank 0
alone calls each Trainer method in ``ONE_RANK_CALLS`` (the methods Axolotl's and the HF
Trainer's callbacks call on one process only; see
``tests/distributed/test_eval_ranks.py``) while the other ranks wait outside any
collective, and saves after each call whether it returned.
A call that enters a collective never returns: the waiting ranks give up after ``WAIT_S``
with exit code 3, and what rank 0 saved so far says which call it was. Every process
also evaluates before and after the stray calls (both ``eval_otr/*`` are saved).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from axolotl_otr.objective import Objective, OTRSettings
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512
WAIT_S = 45


def _prediction_step(trainer, batch, out: Path) -> float:
    """What Axolotl's LogPredictionCallback does on rank 0: logits of one eval batch."""
    trainer.model.eval()
    loss, _, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    return loss.item()


def _compute_loss(trainer, batch, out: Path) -> float:
    """The loss call prediction_step makes (eval mode, no token count): this batch's mean."""
    trainer.model.eval()
    with torch.no_grad():
        loss, _ = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return loss.item()


# name -> what rank 0 does alone (the method, called as the callbacks call it)
ONE_RANK_CALLS: dict[str, Callable] = {
    "prediction_step": _prediction_step,
    "compute_loss": _compute_loss,
    "log_eval_keys": lambda trainer, batch, out: trainer.log({"eval_bench_loss": 0.5}),
    "log_training_keys": lambda trainer, batch, out: trainer.log({"loss": 0.5}),
    "get_eval_dataloader": lambda trainer, batch, out: trainer.get_eval_dataloader(),
    "get_train_dataloader": lambda trainer, batch, out: trainer.get_train_dataloader(),
    "save_model": lambda trainer, batch, out: trainer.save_model(str(out / "saved")),
}


def wait_for(marker: Path, rank: int, what: str) -> None:
    """Wait (outside any collective) until rank 0 says it is past ``what``; exit 3 if not."""
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():
        if time.monotonic() > deadline:
            print(f"rank {rank}: rank 0 did not return from {what} in {WAIT_S} s", flush=True)
            sys.exit(3)
        time.sleep(0.2)


def rank_zero_alone(trainer, calls: dict, batch, out: Path, variant: str, tag: str, saved) -> None:
    """Rank 0 alone makes each of ``calls`` while the other ranks wait outside any
    collective (``wait_for``); rank 0 records each outcome (and a float a call returns)
    under ``variant`` in ``saved`` and saves it to ``out`` after every call, so a call
    that never returns still leaves the earlier outcomes. ``tag`` names the markers."""
    rank = trainer.args.process_index
    saved["calls"][variant] = {}
    saved.setdefault("values", {})[variant] = {}
    for name, call in calls.items():
        marker = out.parent / f"{tag}-{name}.done"
        if rank == 0:
            try:
                value = call(trainer, batch, out.parent / variant)
                outcome = "returned"
                if isinstance(value, float):
                    saved["values"][variant][name] = value
            except Exception as err:  # noqa: BLE001 - reported to the test
                outcome = f"raised {type(err).__name__}: {err}"
            saved["calls"][variant][name] = outcome
            torch.save(saved, out)
            marker.touch()
        else:
            wait_for(marker, rank, f"{variant} {name}")


def one_rank(model: str, out: Path, eval_batch: int) -> None:
    """Rank 0 alone calls each of ``ONE_RANK_CALLS``, for CE and for OTR (see the module
    docstring); rank 0 saves ``{"calls": {variant: {name: outcome}}, "values", "evals"}``."""
    variants = {
        "ce": None,
        "otr_token": OTRSettings(Objective(estimator="exact"), normalization="token"),
        "otr_sequence": OTRSettings(Objective(estimator="exact"), normalization="sequence"),
    }
    eval_examples = make_examples(8, VOCAB, seed=1)
    saved: dict = {"calls": {}, "values": {}, "evals": {}}
    for variant, settings in variants.items():
        trainer, _, _ = build_trainer(
            model, out.parent / f"one-rank-{variant}", make_examples(4, VOCAB),
            micro_batch=eval_batch, accumulation=1, ddp_timeout=120,
            eval_examples=eval_examples, settings=settings, otr=settings is not None,
        )  # fmt: skip
        # As AxolotlTrainer does for Llama (core/trainers/base.py:119-131, 0.19): the
        # model's forward takes no num_items_in_batch, so CE counts no tokens.
        trainer.model_accepts_loss_kwargs = False
        rank = trainer.args.process_index
        batch = trainer.data_collator(eval_examples[:eval_batch])
        before = trainer.evaluate()
        rank_zero_alone(trainer, ONE_RANK_CALLS, batch, out, variant, variant, saved)
        after = trainer.evaluate()
        saved["evals"][variant] = {"before": before, "after": after}
        if rank == 0:
            torch.save(saved, out)


def main() -> None:
    model, out, eval_batch = sys.argv[1:4]
    out = Path(out)
    if sys.argv[4:] == ["one-rank"]:
        one_rank(model, out, int(eval_batch))
        return
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
