"""What makes the loss GPU-ready, checked on CPU: the sync-free code path the GPU takes
(forced here), the compiled chunk math against eager, fp32 accumulation of the lm_head
gradient under bf16 autocast, the device-aware chunk size and the ``otr_compile`` key.
"""

from __future__ import annotations

import pytest
import torch
from draws import replaying
from reference import per_token_loss, reference_loss, shifted
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import axolotl_otr.chunk_budget as chunk_budget
import axolotl_otr.chunk_math as chunk_math
import axolotl_otr.fused as fused
from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.args import OTRArgs
from axolotl_otr.loss import select_targets
from axolotl_otr.objective import Objective
from axolotl_otr.trainer_hook import OTRSettings

B, T, H, V = 2, 11, 8, 29


def data(seed: int, masked: bool = True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    if masked:
        labels[0, :3] = -100
        labels[1, 5] = -100
    return hidden, weight, labels


@pytest.fixture
def sync_free(monkeypatch):
    """Run the loss on CPU the way it runs on a GPU (no host reads of device values)."""
    monkeypatch.setattr(fused, "_sync_free", lambda device: True)


def reference(hidden, weight, labels, estimator, draws):
    logits = hidden @ weight.T
    if estimator == "exact":
        return reference_loss(logits, labels, estimator="exact")
    z, y = shifted(logits, labels)
    return per_token_loss(z, y, estimator="sampled", draws=torch.cat(draws)).mean()


@pytest.mark.parametrize("chunk_size", [3, 7, 64])
@pytest.mark.parametrize("estimator", ["exact", "sampled"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_sync_free_path_equals_reference(path, estimator, chunk_size, sync_free, recorded_draws):
    hidden, weight, labels = data(0)
    kwargs = dict(estimator=estimator, chunk_size=chunk_size, generator=torch.Generator())
    if path == "hidden":
        loss = otr_loss_from_hidden(hidden, weight, labels, **kwargs)
    else:
        loss = otr_loss(hidden @ weight.T, labels, **kwargs)
    ref = reference(hidden, weight, labels, estimator, recorded_draws)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(ref, (hidden, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_sync_free_backward_scales_in_place_and_refuses_a_second_one(path, monkeypatch):
    def run(scale: float):
        hidden, weight, labels = data(2)
        if path == "logits":
            leaf = (hidden @ weight.T).detach().requires_grad_()
            loss = otr_loss(leaf, labels, estimator="exact", chunk_size=3)
        else:
            leaf = hidden
            loss = otr_loss_from_hidden(hidden, weight.detach(), labels, estimator="exact")
        (scale * loss).backward(retain_graph=True)
        return leaf, loss

    cpu_leaf, _ = run(1.0)
    monkeypatch.setattr(fused, "_sync_free", lambda device: True)
    leaf, loss = run(3.0)
    torch.testing.assert_close(leaf.grad, 3.0 * cpu_leaf.grad)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sync_free_nonfinite_logits_raise_once_per_call(estimator, bad, sync_free):
    hidden, weight, labels = data(3)
    logits = (hidden @ weight.T).detach()
    logits[1, 6, 2] = bad  # a scored position (its target labels[1, 7] is kept)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        otr_loss(logits.requires_grad_(), labels, estimator=estimator, chunk_size=3)


class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (a sync on a GPU)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _ListReads(TorchFunctionMode):
    """Counts ``Tensor.tolist`` (a host copy that bypasses the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(fn) -> int:
    dispatch, lists = _HostReads(), _ListReads()
    with dispatch, lists:
        fn()
    return dispatch.count + lists.count


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_sync_free_chunked_loss_reads_the_device_once_per_forward(estimator, sync_free):
    """Many chunks, one host read in forward (the NaN/Inf flag), none in backward."""
    hidden, weight, labels = data(4)
    targets = select_targets(labels)
    obj = Objective(estimator=estimator)
    args = (targets.rows, targets.tokens, targets.scale, obj, torch.Generator(), 2)
    flat = hidden.reshape(-1, H)
    out = {}

    def forward():
        out["loss"] = fused.fused_linear_loss(flat, weight, None, *args)[0]

    assert count_host_reads(forward) == 1
    assert count_host_reads(lambda: out["loss"].backward()) == 0
    # the CPU path reads the row ids once and a flag per chunk: the counter sees them
    fused_cpu = fused.FusedLinearLoss.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "_sync_free", lambda device: False)
        reads = count_host_reads(lambda: fused_cpu(flat, weight, None, *args, False))
    assert reads > 2


class _Multinomial(TorchDispatchMode):
    """Counts ``torch.multinomial`` calls (its K = 1 path reads the device on the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] == "multinomial"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_samples", [1, 2, 256])
def test_sync_free_draws_need_no_multinomial_and_no_host_read(num_samples, sync_free):
    """K = 1 included: the inverse-CDF sampler reads nothing on the host, so the forward's
    one read is still the NaN/Inf flag; ``torch.multinomial`` is never called."""
    hidden, weight, labels = data(8)
    targets = select_targets(labels)
    obj = Objective(num_samples=num_samples)
    args = (targets.rows, targets.tokens, targets.scale, obj, torch.Generator(), 3)
    flat = hidden.reshape(-1, H)
    spy = _Multinomial()
    with spy:
        reads = count_host_reads(lambda: fused.fused_linear_loss(flat, weight, None, *args))
    assert reads == 1
    assert spy.count == 0


# Inductor compiles C++ per graph (seconds each): tiny shapes, both estimators in one
# test, and the `compile` marker lets a quick run skip it.
@pytest.mark.compile
def test_compiled_chunk_math_equals_eager(recorded_draws, monkeypatch):
    hidden, weight, labels = data(5)
    for estimator in ("exact", "sampled"):
        results = []
        for compile in (False, True):
            if compile and estimator == "sampled":
                monkeypatch.setattr(chunk_math, "sample_tokens", replaying(recorded_draws))
            loss, stats = otr_loss_from_hidden(
                hidden, weight, labels, estimator=estimator, chunk_size=4, compile=compile,
                generator=torch.Generator(), return_metrics=True,
            )  # fmt: skip
            results.append((loss, stats, *torch.autograd.grad(loss, (hidden, weight))))
        for eager, compiled in zip(*results, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    head, tail = chunk_math.compiled_stages()
    assert chunk_math._COMPILED["head"] is head  # compiled once, reused


# Reference: fp32 logits from the same bf16-representable inputs. Under autocast each
# chunk's logits are rounded to bf16 (relative error 2**-9) and so is each chunk's logit
# gradient and its weight-gradient product, so each term of the weight gradient carries a
# relative error of a few 2**-9 ~ 2e-3; summed in fp32 the norm-wise error stays there
# (3.5e-3 measured), and 1e-2 leaves room. The hidden states are nearly parallel, so the
# 256 one-row chunks add up coherently: a bf16 accumulator (the previous code) swamps the
# later terms and measured 6.6e-2 on the same data, so this test fails on it.
BF16_RTOL = 1e-2


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_bf16_autocast_weight_gradient_is_accumulated_in_fp32(
    estimator, recorded_draws, monkeypatch
):
    gen = torch.Generator().manual_seed(6)
    rows, hidden_size, vocab = 257, 32, 50
    base = torch.randn(1, 1, hidden_size, generator=gen)
    hidden = base + 0.1 * torch.randn(1, rows, hidden_size, generator=gen)
    hidden = hidden.bfloat16().requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).div_(4).bfloat16().requires_grad_()
    bias = torch.randn(vocab, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=gen)
    kwargs = dict(estimator=estimator, num_samples=64, temperature=1.0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = otr_loss_from_hidden(
            hidden, weight, labels, lm_head_bias=bias, chunk_size=1,
            generator=torch.Generator().manual_seed(0), **kwargs,
        )  # fmt: skip
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3  # cast once, to the params'

    # the reference scores the same draws (bf16 and fp32 logits would sample apart)
    monkeypatch.setattr(chunk_math, "sample_tokens", replaying(recorded_draws))
    ref_params = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    h32, w32, b32 = ref_params
    ref = otr_loss(
        h32 @ w32.T + b32, labels, chunk_size=10**6,
        generator=torch.Generator().manual_seed(0), **kwargs,
    )  # fmt: skip
    ref_grads = torch.autograd.grad(ref, ref_params)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)
    for got, want in zip(grads, ref_grads, strict=True):
        error = (got.float() - want).norm() / want.norm()
        assert error < BF16_RTOL, f"{error:.3e}"


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


def test_explicit_chunk_size_overrides_the_default(monkeypatch):
    seen = []
    original = fused._chunks

    def spy(rows, chunk_size, sync_free):
        seen.append(chunk_size)
        return original(rows, chunk_size, sync_free)

    monkeypatch.setattr(fused, "_chunks", spy)
    hidden, weight, labels = data(7)
    otr_loss_from_hidden(hidden, weight, labels, chunk_size=5)
    otr_loss_from_hidden(hidden, weight, labels)
    assert seen == [5, fused.default_chunk_size(V, 0, "cpu", H)]


def test_otr_compile_key():
    assert OTRArgs().otr_compile is False
    assert OTRArgs(otr_compile=True).otr_compile is True
    with pytest.raises(ValueError, match="otr_compile must be true or false"):
        OTRArgs(otr_compile="ture")
    assert OTRSettings.from_cfg({"otr": True, "otr_compile": True}).compile is True
    assert OTRSettings.from_cfg({"otr": True}).compile is False
