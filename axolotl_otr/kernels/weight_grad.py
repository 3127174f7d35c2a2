"""The lm_head weight gradient of the chunked loss: summed over chunks in fp32, handed
back in the weight's dtype in a storage of exactly its own size.

Accumulation. Under bf16/fp16 GEMMs each chunk adds ``g.T @ h`` ([V, n] x [n, D]) to an
fp32 [V, D] accumulator (a 16-bit accumulator rounds away the small contributions of later
chunks). Where the device has a GEMM that reads 16-bit inputs and adds into an fp32
output in one kernel (CUDA with ``torch.addmm(..., out_dtype=torch.float32)``, probed once
per device and dtype, ``fused_fp32_addmm``), that is all a chunk costs: the accumulator is
read and written once. Elsewhere (CPU, older torch) the product is formed in the compute
dtype in ``WEIGHT_GRAD_BLOCKS`` row blocks of a reused workspace and added into the
accumulator, as before.

Hand-back. A 16-bit weight's gradient is converted in the accumulator's own memory (no
third [V, D] tensor at the peak), but a tensor that views part of a bigger storage keeps
all of it alive: as the parameter's ``.grad`` that is twice its size for the whole
accumulation window (about +1 GB for an 8B model's lm_head). So the accumulator is two
tensors: the top rows in a storage of exactly the 16-bit result's bytes, the rest in a
second one. The top half is narrowed in place, the rest is converted into the bytes the
top half's fp32 values no longer need, and the second storage is dropped: the result owns
exactly its own bytes, and the peak is still the one fp32 accumulator.
"""

from __future__ import annotations

import math

import torch

from .chunk_budget import WEIGHT_GRAD_BLOCKS
from .chunk_math import Workspace

_FUSED: dict[tuple[str, int | None, torch.dtype], bool] = {}


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for 16-bit ``a``, ``b`` and an fp32 ``acc``, in one kernel: the
    products are summed in fp32 inside the GEMM and added to ``acc`` without a 16-bit
    intermediate (``fused_fp32_addmm`` says where this runs)."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def fused_fp32_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` with ``dtype``
    inputs and an fp32 ``acc`` runs on ``device`` (one kernel, fp32 accumulation).

    Only CUDA has the kernel (the CPU raises NotImplementedError); torch before 2.8 has no
    ``out_dtype``, some versions require ``acc`` in the inputs' dtype, and bf16 GEMMs need
    compute capability 8. A tiny call on the device answers all of it, once (the checks
    are on the host: no device sync).
    """
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (device.type, device.index, dtype)
    if key not in _FUSED:
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
            _FUSED[key] = False
        else:
            # Non-zero values: the call must add into ``acc`` (beta 1), not overwrite it.
            a = torch.eye(2, dtype=dtype, device=device) * 2
            acc = torch.ones(2, 2, dtype=torch.float32, device=device)
            want = torch.tensor([[5.0, 1.0], [1.0, 5.0]], device=device)
            try:
                addmm_fp32(acc, a, a)
                _FUSED[key] = bool(torch.equal(acc, want))  # once per device and dtype
            except (RuntimeError, NotImplementedError, TypeError):
                _FUSED[key] = False
    return _FUSED[key]


def _split_row(vocab: int, width: int, narrow: bool) -> tuple[int, int]:
    """(rows of the top part, fp32 elements of its storage).

    For a 16-bit result the top storage has ``ceil(V * D / 2)`` fp32 elements: the bytes
    of the whole 16-bit [V, D] result (exactly, when ``V * D`` is even); its first whole
    rows are the top part. Without narrowing one part holds every row.
    """
    if not narrow:
        return vocab, vocab * width
    elements = math.ceil(vocab * width / 2)
    return (elements // width if width else vocab), elements


class WeightGradAccumulator:
    """fp32 sum over chunks of ``g.T @ h`` for an lm_head weight [V, D]; see the module."""

    def __init__(
        self,
        vocab: int,
        width: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        weight_dtype: torch.dtype,
        workspace: Workspace,
    ) -> None:
        self.vocab, self.width, self.device = vocab, width, device
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        self.workspace = workspace
        self.narrow = weight_dtype != torch.float32
        self.fused = fused_fp32_addmm(device, compute_dtype)
        top_rows, top_elements = _split_row(vocab, width, self.narrow)
        self.top_rows = top_rows
        self._top_storage = torch.zeros(top_elements, dtype=torch.float32, device=device)
        top = self._top_storage[: top_rows * width].view(top_rows, width)
        bottom = torch.zeros(vocab - top_rows, width, dtype=torch.float32, device=device)
        # (first row, fp32 [rows, D] part); a part may have no rows
        self.parts = [(0, top), (top_rows, bottom)]
        self.block_rows = math.ceil(vocab / WEIGHT_GRAD_BLOCKS)

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        """Add ``g.T @ h`` (``g`` [n, V] and ``h`` [n, D], both in the compute dtype)."""
        for first, acc in self.parts:
            rows = acc.shape[0]
            if not rows:
                continue
            g_t = g[:, first : first + rows].t()
            if self.compute_dtype == torch.float32:
                acc.addmm_(g_t, h)
            elif self.fused:
                addmm_fp32(acc, g_t, h)
            else:
                self._add_blocked(acc, g_t, h)

    def _add_blocked(self, acc: torch.Tensor, g_t: torch.Tensor, h: torch.Tensor) -> None:
        """The product in the compute dtype (fp32 inside the GEMM), one row block of a
        reused workspace at a time, added into the fp32 accumulator."""
        for start in range(0, acc.shape[0], self.block_rows):
            stop = min(start + self.block_rows, acc.shape[0])
            block = self.workspace.take_shape(
                "grad_w", stop - start, self.width, self.device, self.compute_dtype
            )
            torch.mm(g_t[start:stop], h, out=block)
            acc[start:stop].add_(block)

    def fp32(self) -> torch.Tensor:
        """The fp32 accumulator as one [V, D] tensor (an fp32 weight: there is one part)."""
        assert not self.narrow
        return self.parts[0][1]

    def narrowed(self, factor: torch.Tensor) -> torch.Tensor:
        """``(sum * factor)`` in the weight's 16-bit dtype, in a storage of its own size
        (when ``V * D`` is even; else one 16-bit element more, copied away). Consumes the
        accumulator."""
        (_, top), (_, bottom) = self.parts
        count = self.vocab * self.width
        out = self._top_storage.view(self.weight_dtype)
        _narrow_in_place(self._top_storage[: top.numel()], self.weight_dtype, factor)
        if bottom.numel():
            # its 16-bit destination lies in top bytes whose fp32 values are converted
            out[top.numel() : count].copy_(bottom.view(-1).mul_(factor))
        self.parts = []
        self._top_storage = None
        result = out[:count].view(self.vocab, self.width)
        if out.numel() != count:  # V * D odd: the storage is one element longer
            result = result.clone()
        return result


def _narrow_in_place(flat: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor) -> None:
    """``(flat * factor).to(dtype)`` written over the first half of ``flat``'s own bytes
    (``flat``: 1-D contiguous fp32 at the start of its storage, destroyed).

    Element i moves from byte 4i to byte 2i. Converting the elements in blocks [a, 2a)
    (after element 0) never overwrites one not read yet, and no block overlaps its
    source, so each is one ``copy_`` (a dtype-converting copy allocates nothing; a
    ``mul`` with a 16-bit ``out`` makes an fp32 temporary on CPU). About log2(numel)
    launches.
    """
    flat = flat.mul_(factor)
    count = flat.numel()
    out = flat.view(dtype)[:count]
    if count:
        out[:1].copy_(flat[:1].clone())  # element 0's source and destination overlap
    start = 1
    while start < count:
        stop = min(2 * start, count)
        out[start:stop].copy_(flat[start:stop])
        start = stop
