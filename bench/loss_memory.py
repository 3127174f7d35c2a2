"""The loss's memory ledger: every buffer named and counted, next to the measured peak.

For the Qwen2.5-0.5B (hidden 896) and Qwen2.5-7B (hidden 3584) lm_head shapes (vocab
151936, bf16 weights and hidden states, as under ``bf16: true``) at 2048 and 8192
positions, with the lm_head frozen (LoRA) and trainable (``modules_to_save``, full
fine-tune), it compares three losses:

- ``otr_sampled`` (K=256) and ``sft_chunked`` (the ``sft`` objective) through
  ``otr_loss_from_hidden``: the analytic peak (``axolotl_otr.chunk_budget``: the chunk's
  [n, V] / [n, K] / [n, D] buffers times its rows, plus the call's [T, D] and [V, D]
  buffers) next to the peak measured on CPU from the allocator's events
  (``bench/memory_probe.py``, kernel-internal copies included). To keep the 7B and 8192
  shapes affordable on a CPU, only the first ``--chunks`` chunks carry targets (the rest
  of the labels are -100): every chunk holds the same buffers and the call's buffers are
  full size, so the peak is the full run's; the GEMM work is a few chunks'.
- ``sft_full``: cross-entropy on the full logits as Hugging Face models compute it
  (``F.linear`` in bf16, then ``cross_entropy`` on the fp32 upcast), measured by a
  dispatch-mode tally of live tensor bytes (``torch.distributed._tools.mem_tracker``) on
  the meta device (its [T, V] buffers do not fit a shared CPU at 8192 positions); for the
  first shape (frozen lm_head) it is cross-checked on CPU with the allocator's events.

Every figure is bytes above the inputs (hidden states, weight, labels), forward and
backward, the returned gradients included. ``--json`` writes them all. The last line is
``otr_vs_sft_chunked=... otr_vs_sft_full=... trainable_head_copies=...`` for the first
shape (2048 positions, hidden 896). ``--device cuda`` measures every chunk on the GPU
(``torch.cuda.max_memory_allocated``), full-logit SFT included.

    python bench/loss_memory.py --json bench/results/loss_memory.json
    python bench/loss_memory.py --quick      # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory_probe import peak_bytes  # noqa: E402

from axolotl_otr import otr_loss_from_hidden  # noqa: E402
from axolotl_otr.objective import Objective  # noqa: E402

VOCAB = 151936
HIDDEN = {"qwen2.5-0.5b": 896, "qwen2.5-7b": 3584}
TOKENS = (2048, 8192)
OBJECTIVES = {"otr_sampled": Objective(), "sft_chunked": Objective("sft")}
DTYPE = torch.bfloat16


def ledger(tokens: int, hidden: int, vocab: int, objective: Objective, trainable: bool, device):
    """(rows per chunk, [(buffer, bytes)], total bytes) of the chunked loss, or None where
    this checkout has no ledger (the code before issue 15)."""
    try:
        from axolotl_otr.chunk_budget import call_buffers, default_budget, row_buffers
        from axolotl_otr.fused import default_chunk_size
    except ImportError:
        return None
    rows = default_chunk_size(
        vocab, tokens, device, hidden, objective=objective, compute_dtype=DTYPE
    )
    rows = min(rows, tokens)
    per_row = row_buffers(vocab, objective, DTYPE, hidden, device)
    items = [(f"{b.name} x {rows} rows", b.bytes * rows) for b in per_row]
    items += [
        (b.name, b.bytes)
        for b in call_buffers(vocab, hidden, tokens, DTYPE, DTYPE, DTYPE, trainable, device)
    ]
    budget = default_budget(device, vocab, tokens, hidden)
    return {
        "rows_per_chunk": rows,
        "budget_bytes": budget,
        "buffers": items,
        "total_bytes": sum(b for _, b in items),
    }


def chunk_size_used(tokens: int, hidden: int, vocab: int, objective: Objective) -> int:
    """The CPU default this checkout uses (before issue 15: one fp32 [n, V] per budget)."""
    from axolotl_otr import fused

    try:
        return fused.default_chunk_size(
            vocab, tokens, "cpu", hidden, objective=objective, compute_dtype=DTYPE
        )
    except TypeError:
        return fused.default_chunk_size(vocab, tokens, "cpu", hidden)


def measure_chunked(tokens, hidden, vocab, objective, trainable, chunks, device) -> int:
    """Peak bytes above the inputs of forward + backward, targets in ``chunks`` chunks
    (0: all)."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(1, tokens + 1, hidden, generator=gen) / 4).to(device, DTYPE)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, DTYPE)
    h.requires_grad_()
    w.requires_grad_(trainable)
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    if chunks:
        rows = chunk_size_used(tokens, hidden, vocab, objective)
        labels[0, chunks * rows + 1 :] = -100
    labels = labels.to(device)
    kinds = dict(objective=objective.kind, num_samples=objective.num_samples)

    def run():
        loss = otr_loss_from_hidden(
            h, w, labels, num_items_in_batch=tokens, chunk_size=None,
            generator=torch.Generator(device=device).manual_seed(0), **kinds,
        )  # fmt: skip
        return torch.autograd.grad(loss, [h, w] if trainable else [h])

    _, peak = peak_bytes(run, device)
    return peak


def sft_full_peak(tokens: int, hidden: int, vocab: int, trainable: bool, device: str) -> int:
    """Peak bytes above the inputs of full-logit cross-entropy (Hugging Face's recipe)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    h = torch.randn(tokens, hidden, device=device, dtype=DTYPE, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, dtype=DTYPE, requires_grad=trainable)
    y = torch.randint(0, vocab, (tokens,), device=device)
    inputs = sum(t.numel() * t.element_size() for t in (h, w, y))

    def run():
        logits = F.linear(h, w)
        loss = F.cross_entropy(logits.float(), y, reduction="sum") / tokens
        return torch.autograd.grad(loss, [h, w] if trainable else [h])

    if device != "meta":
        return peak_bytes(run, device)[1]
    tracker = MemTracker()
    with tracker:
        run()
    return tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"] - inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunks", type=int, default=None, help="chunks that carry targets")
    parser.add_argument("--shapes", nargs="+", choices=list(HIDDEN), default=list(HIDDEN))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.chunks is None:
        args.chunks = 0 if cuda else 2  # a GPU runs every chunk; 0: all
    vocab, tokens_list = VOCAB, tuple(args.tokens)
    shapes = {name: HIDDEN[name] for name in args.shapes}
    if args.quick:
        vocab, shapes, tokens_list = 8000, {"quick": 64}, (256,)
    weight_mib = {name: vocab * d * 2 / 2**20 for name, d in shapes.items()}
    rows = []
    print(
        f"torch {torch.__version__}, {args.device}; bytes above the inputs, MiB; "
        f"bf16 weight and hidden; targets in {args.chunks or 'all'} chunks"
    )
    for name, d in shapes.items():
        for tokens in tokens_list:
            for trainable in (False, True):
                head = "trainable" if trainable else "frozen"
                row = {"shape": name, "hidden": d, "vocab": vocab, "tokens": tokens, "head": head}
                for key, objective in OBJECTIVES.items():
                    measured = measure_chunked(
                        tokens, d, vocab, objective, trainable, args.chunks, args.device
                    )
                    row[key] = {
                        "measured_bytes": measured,
                        "analytic_cpu": ledger(tokens, d, vocab, objective, trainable, "cpu"),
                        "measured_on": args.device,
                        "analytic_gpu": ledger(tokens, d, vocab, objective, trainable, "cuda"),
                    }
                if cuda:
                    full = sft_full_peak(tokens, d, vocab, trainable, "cuda")
                    row["sft_full"] = {"measured_bytes": full, "how": "CUDA max allocated"}
                else:
                    full = sft_full_peak(tokens, d, vocab, trainable, "meta")
                    row["sft_full"] = {"measured_bytes": full, "how": "MemTracker on meta"}
                first = tokens == tokens_list[0] and name == next(iter(shapes))
                if not cuda and first and not trainable:
                    cpu = sft_full_peak(tokens, d, vocab, trainable, "cpu")
                    row["sft_full"]["cpu_allocator_bytes"] = cpu
                otr, sft = (
                    row["otr_sampled"]["measured_bytes"],
                    row["sft_chunked"]["measured_bytes"],
                )
                row["otr_vs_sft_chunked"] = otr / sft
                row["otr_vs_sft_full"] = otr / full
                analytic = row["otr_sampled"]["analytic_gpu" if cuda else "analytic_cpu"]
                shown = f"{analytic['total_bytes'] / 2**20:8.1f}" if analytic else "     n/a"
                print(
                    f"{name:13s} T={tokens:5d} {head:9s} otr {otr / 2**20:8.1f} (ledger {shown})"
                    f"  sft_chunked {sft / 2**20:8.1f}  sft_full {full / 2**20:9.1f}"
                    f"  otr/sft_chunked {otr / sft:.3f}  otr/sft_full {otr / full:.3f}"
                    f"  weight {weight_mib[name]:.0f}"
                )
                rows.append(row)
    for name in shapes:
        for tokens in tokens_list:
            frozen, trainable = (
                next(r for r in rows if r["shape"] == name and r["tokens"] == tokens and
                     r["head"] == h)["otr_sampled"]["measured_bytes"]
                for h in ("frozen", "trainable")
            )  # fmt: skip
            extra = (trainable - frozen) / (weight_mib[name] * 2**20)
            print(f"{name} T={tokens}: a trainable lm_head adds {extra:.2f} copies of itself")
    first = rows[0]
    copies = (rows[1]["otr_sampled"]["measured_bytes"] - first["otr_sampled"]["measured_bytes"]) / (
        weight_mib[first["shape"]] * 2**20
    )
    print(
        f"otr_vs_sft_chunked={first['otr_vs_sft_chunked']:.3f} "
        f"otr_vs_sft_full={first['otr_vs_sft_full']:.3f} trainable_head_copies={copies:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"torch": torch.__version__, "device": args.device, "dtype": "bfloat16"}
            json.dump({**meta, "chunks_with_targets": args.chunks, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
