"""Forward+backward time of CE, DFT, OTR-sampled and OTR-exact on the same logits.

Every variant runs on the same fp32 leaf logits [1, tokens + 1, vocab] (so each scores
``tokens`` shifted targets) and the variants are interleaved round by round in this one
process, so load from other processes hits all of them alike; the figures are medians.

CE is ``torch.nn.functional.cross_entropy`` (mean over the targets); DFT and OTR go
through this package's public ``otr_loss``. The last line is ``key=value`` pairs for the
default (first) shape: ``otr_sampled_vs_ce=<ratio> otr_exact_vs_ce=<ratio>``.

    python bench/loss_speed.py              # 2048 x 32000, then 2048 x 151936
    python bench/loss_speed.py --quick      # tiny shapes, a smoke test in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from axolotl_otr.loss import otr_loss  # noqa: E402


def make_variants(
    labels: torch.Tensor, num_samples: int, chunk_size: int | None
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The losses to compare, each a function of the [1, T + 1, V] logits."""
    shifted = labels[0, 1:]
    generator = torch.Generator(device=labels.device).manual_seed(0)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[0, :-1], shifted)

    def ours(**kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logits: otr_loss(
            logits, labels, generator=generator, chunk_size=chunk_size, **kwargs
        )

    return {
        "ce": ce,
        "dft": ours(objective="dft"),
        "otr_sampled": ours(objective="otr", estimator="sampled", num_samples=num_samples),
        "otr_exact": ours(objective="otr", estimator="exact"),
    }


def time_once(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> float:
    """Seconds of one forward + backward (the gradient is dropped afterwards)."""
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    logits.grad = None
    sync()
    start = time.perf_counter()
    fn(logits).backward()
    sync()
    elapsed = time.perf_counter() - start
    logits.grad = None
    return elapsed


def bench_shape(
    tokens: int,
    vocab: int,
    repeats: int,
    warmup: int,
    num_samples: int,
    chunk_size: int | None,
    device: str,
) -> dict[str, float]:
    """Median seconds of each variant on one [tokens, vocab] shape."""
    gen = torch.Generator().manual_seed(1234)
    logits = (torch.randn(1, tokens + 1, vocab, generator=gen) * 2.0).to(device)
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen).to(device)
    # Make the targets likely under the logits, as in training: pi(y) is not ~1/V.
    with torch.no_grad():
        logits[0, :-1].scatter_add_(1, labels[0, 1:, None], torch.full((tokens, 1), 8.0))
    variants = make_variants(labels, num_samples, chunk_size)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, fn in variants.items():
            elapsed = time_once(fn, logits)
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.repeats, args.warmup = 64, [512, 1000], 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    ratios: dict[str, float] = {}
    for index, vocab in enumerate(args.vocab):
        med = bench_shape(
            args.tokens,
            vocab,
            args.repeats,
            args.warmup,
            args.num_samples,
            args.chunk_size,
            args.device,
        )
        print(f"[{args.tokens} x {vocab}] median fwd+bwd of {args.repeats} interleaved runs:")
        for name, seconds in med.items():
            print(f"  {name:12s} {seconds * 1e3:9.2f} ms  {seconds / med['ce']:5.2f}x CE")
        if index == 0:
            ratios = {
                "otr_sampled_vs_ce": med["otr_sampled"] / med["ce"],
                "otr_exact_vs_ce": med["otr_exact"] / med["ce"],
                "dft_vs_ce": med["dft"] / med["ce"],
            }
    print(" ".join(f"{key}={value:.3f}" for key, value in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
