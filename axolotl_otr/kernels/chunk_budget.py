"""How many positions one loss chunk holds, from a byte budget that counts every buffer.

A chunk of ``n`` scored positions keeps a handful of [n, vocab] buffers alive at once
(its logits, the softmax that becomes the logit gradient, the rollout policy that becomes
the sampler's CDF, a product scratch), plus small [n, K] and [n, hidden] ones. The chunk
size is the number of rows whose buffers fit the budget, so the loss's memory is what the
budget says whatever the objective or dtype. The same ledger names the buffers for
``bench/loss_memory.py``, which puts it next to the measured peak.

Pure torch (dtypes only), no Axolotl import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..objective import Objective

MIB = 1 << 20
# CPU: bytes every buffer of one chunk may hold together. There every torch op is one
# parallel region, and on a shared (oversubscribed) CPU each region can wait milliseconds
# for its threads, so few big ops beat cache-sized ones (bench/loss_speed.py on 2 busy
# cores: 32 -> 128 MiB per fp32 [n, V] buffer took 2048 x 32000 OTR from 1.3x to 1.0x
# cross-entropy). 192 MiB keeps one fp32 [n, V] buffer at about the 64 MiB measured best
# for the three such buffers the default objective holds.
CPU_CHUNK_BYTES = 192 * MIB
# GPU, hidden-state path: at least the rows of Liger-Kernel's fused linear cross-entropy
# for the same shape (``liger_rows``), and at least the rows whose buffers fill this floor,
# so a small hidden size does not cut the loss into thousands of small chunks. Every chunk
# reads the whole lm_head twice (logits and hidden-state gradient) and launches ~30
# kernels, so fewer, larger chunks are what a GPU wants; the memory bound this gives is
# stated in ``gpu_chunk_bound`` and docs/performance.md.
GPU_MIN_CHUNK_BYTES = 32 * MIB
# Logits path on a GPU (no hidden size): the budget of ceil(positions / 16) rows.
GPU_LOGITS_CHUNKS = 16
# A trainable lm_head's per-chunk weight-gradient product is formed in this many row
# blocks of [V, D] (a [V / 32, D] workspace instead of a whole second weight; on CPU the
# fp32 accumulator's add makes an fp32 temporary of the block too: 3/32 of a copy).
WEIGHT_GRAD_BLOCKS = 32


@dataclass(frozen=True)
class Buffer:
    """One buffer of the ledger: its name and its size in bytes."""

    name: str
    bytes: int


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_buffers(
    vocab_size: int,
    objective: Objective,
    compute_dtype: torch.dtype = torch.float32,
    hidden_size: int | None = None,
    device: torch.device | str = "cpu",
) -> list[Buffer]:
    """Bytes per chunk row of every buffer a chunk holds at its peak (one row's share).

    ``hidden_size`` None: the logits path (the chunk's logits are a view of, or a copy
    from, the given logits), otherwise the hidden-state path.
    """
    v, c = vocab_size, _size(compute_dtype)
    where = "copy of the given logits" if hidden_size is None else "h @ W.T"
    rows = [Buffer(f"logits z [n, V] in the compute dtype ({where})", v * c)]
    if c != 4 and torch.device(device).type == "cpu":
        # CPU kernels cast a mixed-dtype input to a temporary in every op; one cast instead
        rows.append(Buffer("logits upcast to fp32 [n, V] (CPU only)", 4 * v))
    rows += [Buffer("softmax, then the logit gradient [n, V] fp32", 4 * v)]
    otr = objective.kind == "otr"
    sampled = otr and objective.estimator == "sampled"
    if otr and (sampled or objective.temperature != 1.0):
        rows.append(Buffer("entropy product, then rollout policy, then its CDF [n, V] fp32", 4 * v))
    else:
        rows.append(Buffer("product scratch (entropy) [n, V] fp32", 4 * v))
    if otr and not sampled and objective.temperature != 1.0:
        rows.append(Buffer("product scratch (E_rollout log pi) [n, V] fp32", 4 * v))
    if sampled:
        k = objective.num_samples
        rows.append(Buffer("draws: uniforms fp32, token ids int64, their logits, hits [n, K]",
                           k * (4 + 8 + c + 1)))  # fmt: skip
    if hidden_size is not None:
        rows.append(Buffer("hidden chunk and its gradient [n, D]", 2 * hidden_size * c))
    return rows


def call_buffers(
    vocab_size: int,
    hidden_size: int,
    positions: int,
    compute_dtype: torch.dtype,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    weight_trainable: bool,
    device: torch.device | str = "cpu",
) -> list[Buffer]:
    """The hidden-state path's buffers that live for the whole call (not per chunk)."""
    v, d, c = vocab_size, hidden_size, _size(compute_dtype)
    out = [Buffer("hidden-state gradient [T, D]", positions * d * _size(hidden_dtype))]
    if weight_dtype != compute_dtype:
        out.append(Buffer("lm_head weight in the compute dtype [V, D]", v * d * c))
    if weight_trainable:
        out.append(Buffer("lm_head weight-gradient accumulator [V, D] fp32", 4 * v * d))
        if compute_dtype != torch.float32:
            block = math.ceil(v / WEIGHT_GRAD_BLOCKS) * d
            out.append(Buffer("weight-gradient product, one row block [V/32, D]", block * c))
            if torch.device(device).type == "cpu":
                out.append(Buffer("its fp32 upcast in the accumulator's add (CPU only)", block * 4))
    return out


def liger_rows(vocab_size: int, hidden_size: int, positions: int) -> int:
    """Rows per chunk under Liger-Kernel's fused linear cross-entropy rule (its default
    memory constant 1): the positions are cut into ``ceil(V / H)`` parts, so that one
    chunk's logits are about as large as the hidden states, and a part is rounded up to
    a power of two, but never past the positions themselves."""
    positions = max(positions, 1)
    parts = math.ceil(vocab_size / max(hidden_size, 1))
    rows = 1 << (math.ceil(positions / parts) - 1).bit_length()  # next power of two
    return min(rows, positions)


def default_budget(
    device: torch.device | str, vocab_size: int, positions: int, hidden_size: int | None
) -> int:
    """Bytes one chunk's buffers may hold where a byte budget sizes the chunk:
    ``CPU_CHUNK_BYTES`` on CPU; on a GPU ``GPU_MIN_CHUNK_BYTES``, or on the logits path
    the fp32 logits of ``ceil(positions / 16)`` rows where that is more. (On a GPU's
    hidden-state path ``default_rows`` takes Liger's rows where they are more.)"""
    if torch.device(device).type == "cpu":
        return CPU_CHUNK_BYTES
    if hidden_size:
        return GPU_MIN_CHUNK_BYTES
    rows = math.ceil(max(positions, 1) / GPU_LOGITS_CHUNKS)
    return max(GPU_MIN_CHUNK_BYTES, 4 * vocab_size * rows)


def chunk_rows(budget: int, buffers: list[Buffer]) -> int:
    """Rows whose per-row buffers fit ``budget`` (at least one)."""
    per_row = sum(b.bytes for b in buffers)
    return max(1, budget // per_row)


def default_rows(
    device: torch.device | str,
    vocab_size: int,
    positions: int,
    hidden_size: int | None,
    buffers: list[Buffer],
) -> int:
    """Rows per chunk: the rows whose ``buffers`` fit ``default_budget``; on a GPU's
    hidden-state path never fewer than Liger-Kernel's rows for the same shape
    (``liger_rows``), whose chunk then holds at most ``gpu_chunk_bound`` bytes."""
    rows = chunk_rows(default_budget(device, vocab_size, positions, hidden_size), buffers)
    if torch.device(device).type != "cpu" and hidden_size:
        rows = max(rows, liger_rows(vocab_size, hidden_size, positions))
    return rows


def gpu_chunk_bound(
    vocab_size: int, hidden_size: int, positions: int, buffers: list[Buffer]
) -> int:
    """The most bytes one GPU chunk's buffers hold on the hidden-state path: Liger's rows
    times every buffer of a row, or ``GPU_MIN_CHUNK_BYTES``, whichever is larger.

    Liger's rows keep a chunk's logits within about twice the hidden states' elements
    (``rows * V < 2 * positions * H + 2 * V``, the factor 2 from the power of two), so
    this bound is about ``2 * positions * H * (row bytes / V)``: with bf16 GEMMs and the
    default objective (about 10 bytes per vocabulary entry and row) about ten times the
    bf16 hidden states, where Liger's own bf16 logits chunk is at most about twice.
    """
    per_row = sum(b.bytes for b in buffers)
    rows = liger_rows(vocab_size, hidden_size, positions)
    return max(GPU_MIN_CHUNK_BYTES, rows * per_row)
