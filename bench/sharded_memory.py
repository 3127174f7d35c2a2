"""What the loss holds per process under a sharded engine, on each loss path.

Under FSDP2 and DeepSpeed ZeRO-3 each process keeps a shard of the lm_head. On the
logits path the model's forward makes the bf16 ``[tokens, vocab]`` logits and the loss
their gradient, both held during the loss; on the hidden-state path (a frozen head,
docs/multi-gpu.md) the loss needs the whole head once per micro-batch instead, plus the
chunk buffers of the loss's own ledger (``axolotl_otr/kernels/chunk_budget.py``).
``sharded_ledger`` names those buffers; ``table`` is the docs/performance.md table
("Sharded engines") made from it, and ``measure`` checks it on CPU at a reduced shape
with the allocator's events (``bench/memory_probe.py``): the real losses, forward and
backward, bytes above the inputs: ``otr_loss`` on the bf16 logits ``F.linear`` makes,
down to the logits' gradient (the backward through the lm_head is the engine's, and
gathers the head on both paths), and ``otr_loss_from_hidden`` on a head concatenated
from two half shards (the buffer an all-gather of 2 processes returns), down to the
hidden states' gradient.

    python -m bench.sharded_memory          # the docs table, then the CPU check
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.kernels.chunk_budget import Buffer, call_buffers, row_buffers
from axolotl_otr.objective import Objective
from bench.memory_probe import peak_bytes

# The heads of the docs table: name -> (vocab, hidden); positions per micro-batch.
HEADS = {"Llama-3-8B": (128256, 4096), "Qwen2.5-7B": (152064, 3584)}
TOKENS = (4096, 16384)
# The CPU check: a head small enough for a shared 2-core machine, whose logits and
# whole head still outweigh the chunk buffers (chunks of CHECK_ROWS positions).
CHECK_SHAPE = {"vocab": 8192, "hidden": 512, "tokens": 1024}
CHECK_ROWS = 64
DTYPE = torch.bfloat16
PATHS = ("logits", "hidden")


def sharded_ledger(
    vocab: int,
    hidden: int,
    tokens: int,
    rows: int | None = None,
    objective: Objective | None = None,
    dtype: torch.dtype = DTYPE,
) -> dict[str, list[Buffer]]:
    """Per process, the buffers the loss holds at its peak above its inputs, by path.

    ``rows`` None: the terms that grow with the model (the docs table); otherwise the
    chunk buffers of chunks of ``rows`` positions and the call's own buffers are added,
    as ``chunk_budget`` counts them on CPU (what ``measure`` sees)."""
    size = torch.empty((), dtype=dtype).element_size()
    ledger = {
        "logits": [
            Buffer("bf16 logits [T, V] (the model's forward)", tokens * vocab * size),
            Buffer("their gradient [T, V]", tokens * vocab * size),
        ],
        "hidden": [Buffer("the whole lm_head [V, D], gathered", vocab * hidden * size)],
    }
    if rows is not None:
        objective = objective or Objective()
        for path, width in (("logits", None), ("hidden", hidden)):
            per_row = row_buffers(vocab, objective, dtype, width, "cpu")
            ledger[path] += [Buffer(f"{b.name} x {rows} rows", b.bytes * rows) for b in per_row]
        ledger["hidden"] += call_buffers(vocab, hidden, tokens, dtype, dtype, dtype, False, "cpu")
    return ledger


def total(buffers: list[Buffer]) -> int:
    return sum(b.bytes for b in buffers)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def table() -> str:
    """The docs/performance.md table: one row per head and positions, from the ledger."""
    lines = [
        "| head (V x D) | tokens per micro-batch | logits path: logits + gradient "
        "| hidden-state path: whole head |",
        "| --- | --- | --- | --- |",
    ]
    for name, (vocab, hidden) in HEADS.items():
        for tokens in TOKENS:
            ledger = sharded_ledger(vocab, hidden, tokens)
            lines.append(
                f"| {name}, {vocab} x {hidden} | {tokens} | {mib(total(ledger['logits']))} "
                f"| {mib(total(ledger['hidden']))} |"
            )
    return "\n".join(lines)


def measure(path: str, vocab: int, hidden: int, tokens: int, rows: int) -> int:
    """Peak bytes above the inputs of the loss on ``path`` (forward and backward, see the
    module's docstring), OTR's default objective, chunks of ``rows`` positions, on CPU."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(1, tokens + 1, hidden, generator=gen) / 4).to(DTYPE).requires_grad_()
    head = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(DTYPE)
    shards = list(head.chunk(2))  # what each of 2 processes keeps
    del head
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    settings = dict(num_items_in_batch=tokens, chunk_size=rows)

    def logits_path():
        weight = torch.cat(shards)  # the model's forward uses the whole head too
        logits = F.linear(h.detach(), weight).requires_grad_()
        del weight  # the engine reshards it after the forward
        loss = otr_loss(logits, labels, generator=torch.Generator().manual_seed(0), **settings)
        # The loss's part ends at the logits' gradient: the backward through the lm_head
        # to the hidden states is the engine's (it gathers the head again, on both paths).
        return torch.autograd.grad(loss, [logits])

    def hidden_path():
        weight = torch.cat(shards)  # the gather of the head, kept for the loss
        loss = otr_loss_from_hidden(
            h, weight, labels, generator=torch.Generator().manual_seed(0), **settings
        )
        return torch.autograd.grad(loss, [h])

    _, peak = peak_bytes({"logits": logits_path, "hidden": hidden_path}[path])
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--table-only", action="store_true", help="print the table, measure nothing"
    )
    args = parser.parse_args(argv)
    print(table())
    if args.table_only:
        return 0
    ledger = sharded_ledger(**CHECK_SHAPE, rows=CHECK_ROWS)
    shape = ", ".join(f"{k}={v}" for k, v in CHECK_SHAPE.items())
    print(f"CPU check at {shape}, chunks of {CHECK_ROWS} rows, torch {torch.__version__}:")
    for path in PATHS:
        measured, expected = measure(path, **CHECK_SHAPE, rows=CHECK_ROWS), total(ledger[path])
        print(
            f"  {path} path: measured {measured / 2**20:.2f} MiB, ledger "
            f"{expected / 2**20:.2f} MiB, ratio {measured / expected:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
