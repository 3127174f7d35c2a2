"""One OTR training step under torch.distributed (gloo, CPU), launched by torchrun.

Usage: python -m torch.distributed.run --nproc_per_node N -m tests.distributed.ddp_worker MODEL OUT
        MICRO_BATCH ACCUMULATION NORMALIZATION
OTR_TEST_AVERAGE_TOKENS=0: the Trainer's ``average_tokens_across_devices`` starts false,
as Axolotl sets it. Rank 0 saves the gradients it holds just before the optimizer step (after DDP's
all-reduce) and the logged metrics to OUT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from axolotl_otr.objective import (
    Objective,
    OTRSettings,
)
from tests.support.trainer_setup import build_trainer, make_examples


def _fail_the_check_here() -> None:
    """OTR_TEST_FAIL_CHECK_ON_RANK=R: the exactness check fails on rank R alone."""
    from axolotl_otr.model import exactness

    if os.environ.get("OTR_TEST_FAIL_CHECK_ON_RANK") == os.environ.get("RANK", "0"):

        def broken(*args, **kwargs):
            raise RuntimeError("this rank's check fails (test)")

        exactness.probe = broken


def main() -> None:
    model, out, micro_batch, accumulation, normalization = sys.argv[1:6]
    _fail_the_check_here()
    settings = OTRSettings(Objective(estimator="exact"), normalization=normalization)
    overrides = {}
    if os.environ.get("OTR_TEST_AVERAGE_TOKENS") == "0":  # what Axolotl sets
        overrides["average_tokens_across_devices"] = False
    trainer, grads, logs = build_trainer(
        model,
        Path(out).parent / "trainer",
        make_examples(8, 512),
        micro_batch=int(micro_batch),
        accumulation=int(accumulation),
        settings=settings,
        **overrides,
    )
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save(
            {
                "grads": grads.grads[0],
                "logs": logs.logs,
                "world": trainer.args.world_size,
                "fused": trainer.output_layer.weight_and_bias is not None,
                "reason": trainer.output_layer.reason,
                "average_tokens": trainer.args.average_tokens_across_devices,
            },
            out,
        )


if __name__ == "__main__":
    main()
