"""The loss's memory ledger: every buffer named and counted, next to the measured peak.

For the Qwen2.5-0.5B (hidden 896) and Qwen2.5-7B (hidden 3584) lm_head shapes (vocab
151936) and the Gemma-3-1B one (vocab 262144, hidden 1152), bf16 weights and hidden
states as under ``bf16: true``, at 2048 and 8192 positions, with the lm_head frozen
(LoRA) and trainable (``modules_to_save``, full fine-tune), it compares three losses:

- ``otr_sampled`` (K=256) and ``sft_chunked`` (the ``sft`` objective) through
  ``otr_loss_from_hidden``: the analytic peak (``axolotl_otr.kernels.chunk_budget``: the
  chunk's [n, V] / [n, K] / [n, D] buffers times its rows, plus the call's [T, D] and
  [V, D] buffers) next to the peak measured on CPU from the allocator's events
  (``bench/memory_probe.py``, kernel-internal copies included). To keep the 7B and 8192
  shapes affordable on a CPU, only the first ``--chunks`` chunks carry targets (the rest
  of the labels are -100): every chunk holds the same buffers and the call's buffers are
  full size, so the peak is the full run's; the GEMM work is a few chunks'.
- ``sft_full``: cross-entropy on the full logits as Hugging Face models compute it
  (``F.linear`` in bf16, then ``cross_entropy`` on the fp32 upcast), measured by a
  dispatch-mode tally of live tensor bytes (``torch.distributed._tools.mem_tracker``) on
  the meta device (its [T, V] buffers do not fit a shared CPU at 8192 positions); for the
  first shape (frozen lm_head) it is cross-checked on CPU with the allocator's events.

``--softcap C`` adds, next to every row, the same shape with soft-capped logits
``C * tanh(r / C)`` (Gemma 2's ``final_logit_softcapping``, 30): the chunked losses get
``logit_softcap=C`` (the cap is applied to each chunk's logits in place and its gradient
factor reuses a scratch buffer, so the ledger is unchanged), full-logit SFT applies the
cap to the bf16 logits as Gemma 2's ``forward`` does (divide, tanh, multiply).

Every figure is bytes above the inputs (hidden states, weight, labels), forward and
backward, the returned gradients included. ``--json`` writes them all. The last line is
``otr_vs_sft_chunked=... otr_vs_sft_full=... trainable_head_copies=...`` for the first
shape (2048 positions, hidden 896). ``--device cuda`` measures every chunk on the GPU
(``torch.cuda.max_memory_allocated``), full-logit SFT included.

    python -m bench.loss_memory --json bench/results/loss_memory.json
    python -m bench.loss_memory --quick      # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from axolotl_otr import otr_loss_from_hidden
from axolotl_otr.objective import Objective
from bench.memory_probe import peak_bytes

# lm_head shapes: name -> (vocab, hidden)
SHAPES = {
    "qwen2.5-0.5b": (151936, 896),
    "qwen2.5-7b": (151936, 3584),
    "gemma-3-1b": (262144, 1152),
}
TOKENS = (2048, 8192)
OBJECTIVES = {"otr_sampled": Objective(), "sft_chunked": Objective("sft")}
DTYPE = torch.bfloat16


def ledger(tokens: int, hidden: int, vocab: int, objective: Objective, trainable: bool, device):
    """(rows per chunk, [(buffer, bytes)], total bytes) of the chunked loss, or None where
    this checkout has no ledger (the code before issue 15)."""
    try:
        from axolotl_otr.kernels.chunk_budget import call_buffers, default_budget, row_buffers
        from axolotl_otr.kernels.fused import default_chunk_size
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
    from axolotl_otr.kernels import fused

    try:
        return fused.default_chunk_size(
            vocab, tokens, "cpu", hidden, objective=objective, compute_dtype=DTYPE
        )
    except TypeError:
        return fused.default_chunk_size(vocab, tokens, "cpu", hidden)


def measure_chunked(
    tokens, hidden, vocab, objective, trainable, chunks, device, softcap=None
) -> int:
    """Peak bytes above the inputs of forward + backward, targets in ``chunks`` chunks
    (0: all); ``softcap``: the logits are ``softcap * tanh(r / softcap)``."""
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
    kinds = dict(objective=objective.kind, num_samples=objective.num_samples, logit_softcap=softcap)

    def run():
        loss = otr_loss_from_hidden(
            h, w, labels, num_items_in_batch=tokens, chunk_size=None,
            generator=torch.Generator(device=device).manual_seed(0), **kinds,
        )  # fmt: skip
        return torch.autograd.grad(loss, [h, w] if trainable else [h])

    _, peak = peak_bytes(run, device)
    return peak


def sft_full_peak(
    tokens: int, hidden: int, vocab: int, trainable: bool, device: str, softcap=None
) -> int:
    """Peak bytes above the inputs of full-logit cross-entropy (Hugging Face's recipe;
    with ``softcap``, Gemma 2's: the bf16 logits divided, tanh'd and multiplied)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    h = torch.randn(tokens, hidden, device=device, dtype=DTYPE, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, dtype=DTYPE, requires_grad=trainable)
    y = torch.randint(0, vocab, (tokens,), device=device)
    inputs = sum(t.numel() * t.element_size() for t in (h, w, y))

    def run():
        logits = F.linear(h, w)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits.float(), y, reduction="sum") / tokens
        return torch.autograd.grad(loss, [h, w] if trainable else [h])

    if device != "meta":
        return peak_bytes(run, device)[1]
    tracker = MemTracker()
    with tracker:
        run()
    return tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"] - inputs


def label(name: str, softcap: float | None) -> str:
    """The shape's name, with its soft-cap where the logits are capped."""
    return name if softcap is None else f"{name} cap{softcap:g}"


def measure_row(name, vocab, d, tokens, softcap, trainable, args, cpu_check) -> dict:
    """Every figure of one shape, position count, soft-cap and head, printed on one line.

    ``cpu_check``: positions at which full-logit SFT is also measured with the CPU
    allocator (0: not), next to the meta tally at the same positions."""
    cuda = args.device == "cuda"
    head = "trainable" if trainable else "frozen"
    row = {
        "shape": name, "hidden": d, "vocab": vocab, "tokens": tokens, "head": head,
        "softcap": softcap,
    }  # fmt: skip
    for key, objective in OBJECTIVES.items():
        measured = measure_chunked(
            tokens, d, vocab, objective, trainable, args.chunks, args.device, softcap
        )
        row[key] = {
            "measured_bytes": measured,
            "analytic_cpu": ledger(tokens, d, vocab, objective, trainable, "cpu"),
            "measured_on": args.device,
            "analytic_gpu": ledger(tokens, d, vocab, objective, trainable, "cuda"),
        }
    if cuda:
        full = sft_full_peak(tokens, d, vocab, trainable, "cuda", softcap)
        row["sft_full"] = {"measured_bytes": full, "how": "CUDA max allocated"}
    else:
        full = sft_full_peak(tokens, d, vocab, trainable, "meta", softcap)
        row["sft_full"] = {"measured_bytes": full, "how": "MemTracker on meta"}
    if cpu_check:
        meta = full if cpu_check == tokens else None
        if meta is None:
            meta = sft_full_peak(cpu_check, d, vocab, trainable, "meta", softcap)
        cpu = sft_full_peak(cpu_check, d, vocab, trainable, "cpu", softcap)
        row["sft_full"]["cpu_check"] = {
            "tokens": cpu_check, "meta_bytes": meta, "cpu_allocator_bytes": cpu
        }  # fmt: skip
        if cpu_check == tokens:
            row["sft_full"]["cpu_allocator_bytes"] = cpu
        print(
            f"  cross-check, full-logit SFT at {cpu_check} positions: meta tally "
            f"{meta / 2**20:.1f} MiB, CPU allocator {cpu / 2**20:.1f} MiB"
        )
    otr, sft = row["otr_sampled"]["measured_bytes"], row["sft_chunked"]["measured_bytes"]
    row["otr_vs_sft_chunked"] = otr / sft
    row["otr_vs_sft_full"] = otr / full
    analytic = row["otr_sampled"]["analytic_gpu" if cuda else "analytic_cpu"]
    shown = f"{analytic['total_bytes'] / 2**20:8.1f}" if analytic else "     n/a"
    print(
        f"{label(name, softcap):17s} T={tokens:5d} {head:9s} otr {otr / 2**20:8.1f} "
        f"(ledger {shown})  sft_chunked {sft / 2**20:8.1f}  sft_full {full / 2**20:9.1f}"
        f"  otr/sft_chunked {otr / sft:.3f}  otr/sft_full {otr / full:.3f}"
        f"  weight {vocab * d * 2 / 2**20:.0f}"
    )
    return row


def summarize(rows: list[dict]) -> None:
    """What a trainable lm_head adds, and what soft-capping adds, per shape and positions."""

    def find(name, tokens, softcap, head):
        return next(
            r for r in rows
            if (r["shape"], r["tokens"], r["softcap"], r["head"]) == (name, tokens, softcap, head)
        )  # fmt: skip

    keys = dict.fromkeys((r["shape"], r["tokens"], r["softcap"]) for r in rows)
    for name, tokens, softcap in keys:
        frozen, trainable = (find(name, tokens, softcap, h) for h in ("frozen", "trainable"))
        weight = frozen["vocab"] * frozen["hidden"] * 2
        extra = trainable["otr_sampled"]["measured_bytes"] - frozen["otr_sampled"]["measured_bytes"]
        print(
            f"{label(name, softcap)} T={tokens}: a trainable lm_head adds "
            f"{extra / weight:.2f} copies of itself"
        )
        if softcap is None:
            continue
        for head in ("frozen", "trainable"):
            capped, plain = find(name, tokens, softcap, head), find(name, tokens, None, head)
            added = {
                key: (capped[key]["measured_bytes"] - plain[key]["measured_bytes"]) / 2**20
                for key in ("otr_sampled", "sft_chunked", "sft_full")
            }
            print(
                f"{label(name, softcap)} T={tokens} {head}: soft-capping adds "
                + ", ".join(f"{key} {mib:+.1f} MiB" for key, mib in added.items())
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunks", type=int, default=None, help="chunks that carry targets")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument(
        "--softcap", type=float, default=None,
        help="also measure every row with logits soft-capped at this value (Gemma 2: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-check-tokens", type=int, default=None,
        help="positions of the CPU-allocator cross-check of full-logit SFT on the first "
        "shape, frozen head (default: the first --tokens; 0: none)",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.chunks is None:
        args.chunks = 0 if cuda else 2  # a GPU runs every chunk; 0: all
    tokens_list = tuple(args.tokens)
    shapes = {name: SHAPES[name] for name in args.shapes}
    if args.quick:
        shapes, tokens_list = {"quick": (8000, 64)}, (256,)
    caps = (None,) if args.softcap is None else (None, args.softcap)
    check = tokens_list[0] if args.cpu_check_tokens is None else args.cpu_check_tokens
    rows = []
    print(
        f"torch {torch.__version__}, {args.device}; bytes above the inputs, MiB; "
        f"bf16 weight and hidden; targets in {args.chunks or 'all'} chunks"
    )
    first_name = next(iter(shapes))
    for name, (vocab, d) in shapes.items():
        for tokens in tokens_list:
            for softcap in caps:
                for trainable in (False, True):
                    first = tokens == tokens_list[0] and name == first_name
                    cpu_check = check if not cuda and first and not trainable else 0
                    rows.append(
                        measure_row(name, vocab, d, tokens, softcap, trainable, args, cpu_check)
                    )
    summarize(rows)
    first, second = rows[0], rows[1]
    weight = first["vocab"] * first["hidden"] * 2
    copies = (
        second["otr_sampled"]["measured_bytes"] - first["otr_sampled"]["measured_bytes"]
    ) / weight
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
