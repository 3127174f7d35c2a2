"""The device-aware chunk size (``kernels/chunk_budget.py``): rows from a byte budget over
every buffer of one row, and never fewer rows on CUDA than Liger-Kernel's rule.
"""

from __future__ import annotations

import pytest
import torch

import axolotl_otr.kernels.chunk_budget as chunk_budget
import axolotl_otr.kernels.fused as fused
from axolotl_otr.objective import Objective

B, T, H, V = 2, 11, 8, 29


def test_default_chunk_size_per_device():
    """Rows per chunk = the device's byte budget over every buffer of one row."""
    otr, sft = Objective(), Objective("sft")
    v, d = 151936, 896
    # CPU: CPU_CHUNK_BYTES over z (fp32) + pi + rollout/CDF + the draws' [K] buffers
    per_row = 12 * v + 256 * (4 + 8 + 4 + 1) + 2 * d * 4
    assert fused.default_chunk_size(v, 2048, "cpu", d) == fused.CHUNK_BYTES // per_row
    # the same three [n, V] buffers for SFT (z, pi, product): about the same rows
    assert (
        fused.default_chunk_size(v, 2048, "cpu", d, objective=sft) >= fused.CHUNK_BYTES // per_row
    )
    # exact OTR at kappa != 1 holds a fourth: fewer rows
    exact = fused.default_chunk_size(v, 2048, "cpu", d, objective=Objective(estimator="exact"))
    assert exact < fused.CHUNK_BYTES // per_row
    # bf16 logits on CPU are upcast once (a fourth [n, V] buffer): fewer rows
    bf16 = fused.default_chunk_size(v, 2048, "cpu", d, compute_dtype=torch.bfloat16)
    assert bf16 < fused.CHUNK_BYTES // per_row
    # on a GPU bf16 logits are read as they are: more rows than fp32 where the byte floor
    # decides (where Liger's rows decide, the same rows)
    gpu = [
        fused.default_chunk_size(v, 2048, "cuda", d, compute_dtype=t)
        for t in (torch.float32, torch.bfloat16)
    ]
    assert gpu[1] > gpu[0]
    # GPU, hidden path: Liger's rows (next_power_of_2(ceil(T / ceil(V / H)))), or the rows
    # whose buffers fill GPU_MIN_CHUNK_BYTES where more: 2048 x 896 -> 16 Liger rows, the
    # 32 MiB floor holds more
    floor = chunk_budget.GPU_MIN_CHUNK_BYTES
    assert chunk_budget.default_budget("cuda", v, 2048, d) == floor
    buffers = chunk_budget.row_buffers(v, otr, torch.float32, d, "cuda")
    rows = fused.default_chunk_size(v, 2048, "cuda", d, objective=otr)
    assert rows == floor // sum(b.bytes for b in buffers) > 16
    # 8192 x 3584 -> 256 Liger rows, more than the floor holds
    rows = fused.default_chunk_size(v, 8192, "cuda", 3584, objective=otr)
    assert rows == chunk_budget.liger_rows(v, 3584, 8192) == 256
    assert fused.default_chunk_size(32000, 1, "cuda", 4096) >= 1


@pytest.mark.parametrize(
    "objective", [Objective(), Objective("sft"), Objective(estimator="exact", temperature=0.8)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_chunks_are_never_smaller_than_liger_kernels(objective, dtype):
    """Issue 30, finding 5: on CUDA the hidden-state path's chunk has at least the rows of
    Liger-Kernel's rule for the same shape (before: Qwen2.5-0.5B 21 rows where Liger has
    32 at 4k tokens, Llama-3-8B 50 where it has 128: every chunk reads the whole lm_head
    twice), and its buffers stay within the stated bound: Liger's rows times every buffer
    of a row, or the 32 MiB floor, whichever is larger. The CPU default is unchanged."""
    smaller = []
    for vocab in GRID_VOCAB:
        for hidden_size in GRID_HIDDEN:
            for tokens in GRID_TOKENS:
                liger = liger_chunk_rows(tokens, hidden_size, vocab)
                rows = fused.default_chunk_size(
                    vocab, tokens, "cuda", hidden_size, objective=objective, compute_dtype=dtype
                )
                if rows < liger:
                    smaller.append((vocab, hidden_size, tokens, rows, liger))
                buffers = chunk_budget.row_buffers(vocab, objective, dtype, hidden_size, "cuda")
                per_row = sum(b.bytes for b in buffers)
                bound = max(chunk_budget.GPU_MIN_CHUNK_BYTES, liger * per_row)
                assert rows * per_row <= bound, (vocab, hidden_size, tokens, rows, liger)
                cpu = fused.default_chunk_size(
                    vocab, tokens, "cpu", hidden_size, objective=objective, compute_dtype=dtype
                )
                cpu_buffers = chunk_budget.row_buffers(vocab, objective, dtype, hidden_size)
                assert cpu == fused.CHUNK_BYTES // sum(b.bytes for b in cpu_buffers)
    assert not smaller, smaller
    # the two cases, 4096 tokens, bf16
    qwen = fused.default_chunk_size(151936, 4096, "cuda", 896, compute_dtype=torch.bfloat16)
    llama = fused.default_chunk_size(128256, 4096, "cuda", 4096, compute_dtype=torch.bfloat16)
    assert (qwen, llama) == (32, 128)
    buffers = chunk_budget.row_buffers(128256, objective, dtype, 4096, "cuda")
    bound = chunk_budget.gpu_chunk_bound(128256, 4096, 4096, buffers)
    assert bound == 128 * sum(b.bytes for b in buffers)


def liger_chunk_rows(tokens: int, hidden_size: int, vocab: int) -> int:
    """Liger-Kernel's fused linear cross-entropy chunk rows, restated from its source
    (src/liger_kernel/ops/fused_linear_cross_entropy.py, default chunk_mem_const 1):
    inc_factor = cdiv(V, H); chunk_size = min(next_power_of_2(cdiv(BT, inc_factor)), BT)."""
    inc_factor = -(-vocab // hidden_size)
    wanted = -(-tokens // inc_factor)
    power = 1
    while power < wanted:
        power *= 2
    return min(power, tokens)


GRID_VOCAB = (32000, 49152, 128256, 151936, 262144)
GRID_HIDDEN = (576, 896, 2048, 4096, 8192)
GRID_TOKENS = (512, 1024, 4096, 16384)
