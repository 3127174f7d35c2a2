"""What the attach-time exactness check costs: wall time and peak extra memory.

``exactness.verify_output_layer`` runs once per training run, when OTR is attached: one
forward pass of 8 tokens and a float64 product of those 8 hidden states with the lm_head
(read in 64 MiB row blocks). This script times it (median of ``--repeats``) and reads
the peak extra memory: on CUDA ``max_memory_allocated`` above what was allocated before
the call, on CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) above its resident set before the call.

Shapes: the tiny test twin (Llama, vocab 128, hidden 32) and the Gemma-3-1B output shape
(vocab 262144, hidden 1152, its head and attention sizes) with ``--layers`` decoder
layers (2 by default: the check's cost beyond the 8-token forward is the lm_head's,
which does not depend on depth; each real layer adds one 8-token layer forward).

    python -m bench.exactness_cost [--quick] [--device cuda] [--dtype bf16] [--layers 26]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from axolotl_otr.model.capture import find_decoder
from axolotl_otr.model.exactness import verify_output_layer
from axolotl_otr.model.output_layer import resolve_output_layer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {
    "tiny-llama": dict(
        model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    ),
    "gemma3-1b-head": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
    ),
}  # fmt: skip


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def measure(shape: str, layers: int, device: torch.device, dtype: torch.dtype, repeats: int):
    """(median seconds, peak extra bytes, the chosen transform) of the check."""
    options = dict(SHAPES[shape])
    config = AutoConfig.for_model(options.pop("model_type"), num_hidden_layers=layers, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train()
    layer, decoder = resolve_output_layer(model), find_decoder(model)
    verify_output_layer(model, layer, decoder)  # warm-up (first-call allocations, kernels)
    times, extra = [], 0
    for _ in range(repeats):
        before = _reset_peak(device)
        start = time.perf_counter()
        result = verify_output_layer(model, layer, decoder)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        extra = max(extra, _peak(device) - before)
    assert result.weight_and_bias is not None, result.reason
    params = sum(p.numel() for p in model.parameters())
    return statistics.median(times), extra, result.transform.describe(), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny shape only")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = ["tiny-llama"] if args.quick else list(SHAPES)
    for shape in shapes:
        seconds, extra, transform, params = measure(shape, args.layers, device, dtype, args.repeats)
        print(
            f"shape={shape} layers={args.layers} params={params} device={device.type} "
            f"dtype={args.dtype} check_ms={1000 * seconds:.1f} "
            f"check_peak_extra_mib={extra / 2**20:.1f} transform={transform!r}"
        )


if __name__ == "__main__":
    main()
