"""Forward+backward time of CE, DFT, OTR-sampled and OTR-exact on the same inputs.

Two modes. Default: every variant runs on the same leaf logits [1, tokens + 1, vocab]
(fp32 on CPU), so each scores ``tokens`` shifted targets; CE is
``torch.nn.functional.cross_entropy``. ``--hidden H``: every variant starts from the same
hidden states [1, tokens + 1, H] and a frozen lm_head weight [vocab, H] (the LoRA case),
CE computes the full logits first (``F.linear`` then ``cross_entropy`` on fp32 logits, as
Hugging Face models do), Liger-Kernel's fused linear cross-entropy is added when the
package is installed (it needs CUDA), and DFT/OTR go through ``otr_loss_from_hidden``.
``--compile`` adds OTR variants with ``otr_compile``. The variants are interleaved round
by round in this one process, so load from other processes hits all of them alike; the
figures are medians (on CUDA also the peak memory above the inputs).

The last line is ``key=value`` pairs for the first shape: ``otr_sampled_vs_ce=<ratio>
otr_exact_vs_ce=<ratio> dft_vs_ce=<ratio>`` (and ``*_vs_liger`` with Liger).

    python -m bench.loss_speed              # 2048 x 32000, then 2048 x 151936
    python -m bench.loss_speed --quick      # tiny shapes, a smoke test in seconds
    python -m bench.loss_speed --device cuda --hidden 896 1536 --vocab 151936 --compile
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from axolotl_otr.loss import otr_loss, otr_loss_from_hidden

Loss = Callable[[torch.Tensor], torch.Tensor]


def liger_loss(device: str) -> Callable | None:
    """Liger-Kernel's fused linear cross-entropy module, or None (with the reason
    printed) where it cannot run: its Triton kernels need CUDA."""
    if importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel is not installed: no Liger fused linear cross-entropy variant")
        return None
    if torch.device(device).type != "cuda":
        print("liger-kernel needs CUDA (Triton): no Liger variant on this device")
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")


def make_variants(
    labels: torch.Tensor,
    num_samples: int,
    chunk_size: int | None,
    weight: torch.Tensor | None = None,
    compile: bool = False,
    liger: Callable | None = None,
) -> dict[str, Loss]:
    """The losses to compare, each a function of the logits (or, with ``weight``, the
    hidden states) [1, T + 1, D]."""
    shifted = labels[0, 1:]
    generator = torch.Generator(device=labels.device).manual_seed(0)

    def ce(x: torch.Tensor) -> torch.Tensor:
        logits = x[0, :-1] if weight is None else F.linear(x[0, :-1], weight)
        return F.cross_entropy(logits.float(), shifted)

    def ours(**kwargs) -> Loss:
        kwargs.update(generator=generator, chunk_size=chunk_size)
        if weight is None:
            return lambda x: otr_loss(x, labels, **kwargs)
        return lambda x: otr_loss_from_hidden(x, weight, labels, **kwargs)

    variants = {"ce": ce}
    if liger is not None and weight is not None:
        variants["liger_flce"] = lambda x: liger(weight, x[0, :-1], shifted)
    variants["dft"] = ours(objective="dft")
    variants["otr_sampled"] = ours(estimator="sampled", num_samples=num_samples)
    variants["otr_exact"] = ours(estimator="exact")
    if compile:
        variants["otr_sampled_compiled"] = ours(
            estimator="sampled", num_samples=num_samples, compile=True
        )
        variants["otr_exact_compiled"] = ours(estimator="exact", compile=True)
    return variants


def time_once(fn: Loss, leaf: torch.Tensor) -> tuple[float, int]:
    """(seconds of one forward + backward, CUDA peak bytes above the start or 0)."""
    cuda = leaf.is_cuda
    leaf.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn(leaf).backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    leaf.grad = None
    return elapsed, peak


def make_inputs(tokens: int, vocab: int, hidden: int | None, device: str, dtype: torch.dtype):
    """(leaf [1, tokens + 1, D], labels, frozen lm_head weight or None)."""
    gen = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    if hidden is None:
        logits = torch.randn(1, tokens + 1, vocab, generator=gen) * 2.0
        # Make the targets likely under the logits, as in training: pi(y) is not ~1/V.
        logits[0, :-1].scatter_add_(1, labels[0, 1:, None], torch.full((tokens, 1), 8.0))
        leaf, weight = logits, None
    else:
        leaf = torch.randn(1, tokens + 1, hidden, generator=gen)
        weight = torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)
        weight = weight.to(device=device, dtype=dtype)
    leaf = leaf.to(device=device, dtype=dtype).requires_grad_(True)
    return leaf, labels.to(device), weight


def bench_shape(
    tokens: int,
    vocab: int,
    hidden: int | None,
    args: argparse.Namespace,
    dtype: torch.dtype,
    liger: Callable | None,
) -> dict[str, dict[str, float]]:
    """Median seconds (and CUDA peak MiB) of each variant on one shape."""
    leaf, labels, weight = make_inputs(tokens, vocab, hidden, args.device, dtype)
    variants = make_variants(labels, args.num_samples, args.chunk_size, weight, args.compile, liger)
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks = dict.fromkeys(variants, 0)
    for round_index in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            elapsed, peak = time_once(fn, leaf)
            peaks[name] = max(peaks[name], peak)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    return {
        name: {"ms": statistics.median(values) * 1e3, "peak_mib": peaks[name] / 2**20}
        for name, values in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=None, help="hidden-state mode, per H"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--compile", action="store_true", help="add otr_compile variants")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.repeats, args.warmup = 64, [512, 1000], 3, 1
        args.hidden = [16] if args.hidden else None
    if args.threads:
        torch.set_num_threads(args.threads)
    # fp32 logits on CPU (what was tuned there); bf16 as trained on a GPU
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    liger = liger_loss(args.device) if args.hidden else None

    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"{dtype_name}"
    )
    shapes = [(v, h) for h in (args.hidden or [None]) for v in args.vocab]
    results, ratios = [], {}
    for index, (vocab, hidden) in enumerate(shapes):
        med = bench_shape(args.tokens, vocab, hidden, args, dtype, liger)
        what = f"hidden {hidden} -> vocab {vocab}" if hidden else f"logits x {vocab}"
        print(f"[{args.tokens} x {what}] median fwd+bwd of {args.repeats} interleaved runs:")
        ce = med["ce"]["ms"]
        for name, fig in med.items():
            line = f"  {name:22s} {fig['ms']:9.2f} ms  {fig['ms'] / ce:5.2f}x CE"
            if "liger_flce" in med:
                line += f"  {fig['ms'] / med['liger_flce']['ms']:5.2f}x Liger"
            if args.device == "cuda":
                line += f"  peak +{fig['peak_mib']:8.1f} MiB"
            print(line)
        results.append({"tokens": args.tokens, "vocab": vocab, "hidden": hidden, "ms": med})
        if index == 0:
            for name in ("otr_sampled", "otr_exact", "dft"):
                ratios[f"{name}_vs_ce"] = med[name]["ms"] / ce
                if "liger_flce" in med:
                    ratios[f"{name}_vs_liger"] = med[name]["ms"] / med["liger_flce"]["ms"]
    if args.json:
        meta = {"torch": torch.__version__, "device": args.device, "dtype": dtype_name}
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump({**meta, "num_samples": args.num_samples, "shapes": results}, f, indent=1)
    print(" ".join(f"{key}={value:.3f}" for key, value in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
