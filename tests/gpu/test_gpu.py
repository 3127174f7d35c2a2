"""Checks that need a CUDA GPU: bf16, the chunked path under autocast, the CUDA sampler,
one host sync per forward and none in backward, the compiled chunk math, fp32 lm_head
gradient accumulation, the GPU chunk size (byte budget), the trainable lm_head's memory,
fp16 gradients without underflow, 4-bit QLoRA (bitsandbytes) and
flash-attention with packed sequences (the other checks use sdpa attention).

Every test skips cleanly without CUDA (and without the optional package it needs); run
them all with `make gpu-check` (scripts/gpu_check.sh) on a machine with a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch

from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.objective import Objective, OTRSettings
from tests.support.draws import replaying
from tests.support.reference import reference_loss
from tests.support.trainer_setup import build_trainer, make_examples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
VOCAB = 512


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"needs the {module} package"
    )


def cuda_batch(dtype=torch.bfloat16, vocab=32000, tokens=(4, 256), seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(*tokens, vocab, device="cuda", generator=gen).mul_(3).to(dtype)
    labels = torch.randint(0, vocab, tokens, device="cuda", generator=gen)
    labels[:, :17] = -100
    return logits.requires_grad_(), labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_loss_on_cuda_matches_the_fp32_reference(dtype):
    logits, labels = cuda_batch(dtype)
    loss = otr_loss(logits, labels, estimator="exact")
    assert loss.dtype == torch.float32
    ref_logits = logits.detach().float().requires_grad_()
    ref = reference_loss(ref_logits, labels, estimator="exact")
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2e-2, atol=1e-6)


def test_cuda_sampler_is_seeded_and_reproducible():
    logits, labels = cuda_batch()

    def run(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return otr_loss(logits, labels, generator=gen)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_chunked_hidden_path_under_bf16_autocast(estimator):
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2, 512, 256, device="cuda", generator=gen, requires_grad=True)
    weight = torch.randn(32000, 256, device="cuda", generator=gen).div_(16).requires_grad_()
    labels = torch.randint(0, 32000, (2, 512), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = otr_loss_from_hidden(
            hidden,
            weight,
            labels,
            estimator=estimator,
            chunk_size=300,
            generator=torch.Generator(device="cuda").manual_seed(0),
        )
        full = otr_loss(
            hidden @ weight.T,
            labels,
            estimator=estimator,
            chunk_size=300,
            generator=torch.Generator(device="cuda").manual_seed(0),
        )
    torch.testing.assert_close(fused, full, rtol=1e-3, atol=1e-4)
    grads_fused = torch.autograd.grad(fused, (hidden, weight))
    grads_full = torch.autograd.grad(full, (hidden, weight))
    for a, b in zip(grads_fused, grads_full, strict=True):
        assert a.dtype == torch.float32  # gradients come back in the parameters' dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=1e-5)


def test_bf16_training_steps_through_the_trainer_mixin(tiny_dir, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    trainer, _, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(16, VOCAB), micro_batch=4, accumulation=2,
        max_steps=4, use_cpu=False, bf16=True, settings=OTRSettings(Objective()),
    )  # fmt: skip
    assert trainer.output_layer.weight_and_bias is not None
    trainer.train()
    steps = [log for log in logs.logs if "loss" in log]
    assert len(steps) == 4
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["otr/ce"]) for log in steps)
    print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


@needs("bitsandbytes")
def test_qlora_4bit_adapter_receives_the_otr_gradient(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )

    def wrap(model):
        model = prepare_model_for_kbit_training(model)
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    trainer, grads, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(8, VOCAB), micro_batch=4, accumulation=1,
        max_steps=2, use_cpu=False, bf16=True, settings=OTRSettings(Objective()),
        model_kwargs={"quantization_config": quant, "device_map": {"": 0}}, wrap_model=wrap,
    )  # fmt: skip
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    trainer.train()
    lora_b = {n: g for n, g in grads.grads[0].items() if "lora_B" in n}
    assert lora_b and all(g.abs().sum() > 0 for g in lora_b.values())
    assert all(math.isfinite(log["otr/ce"]) for log in logs.logs if "otr/ce" in log)


@needs("flash_attn")
def test_flash_attention_packed_batch_equals_separate_sequences(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir / "model", torch_dtype=torch.bfloat16, attn_implementation="flash_attention_2"
    ).cuda()
    examples = make_examples(4, VOCAB)
    features = [
        {"input_ids": e["input_ids"][e["attention_mask"].bool()].tolist(),
         "labels": e["labels"][e["attention_mask"].bool()].tolist()}
        for e in examples
    ]  # fmt: skip
    packed = DataCollatorWithFlattening(return_position_ids=True)(features)
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"].cuda(), position_ids=packed["position_ids"].cuda()
        ).logits
        packed_loss = otr_loss(
            logits, packed["labels"].cuda(), estimator="exact",
            position_ids=packed["position_ids"].cuda(),
        )  # fmt: skip
        total, count = 0.0, 0
        for feature in features:
            ids = torch.tensor([feature["input_ids"]], device="cuda")
            labels = torch.tensor([feature["labels"]], device="cuda")
            n = int((labels[:, 1:] != -100).sum())
            total += otr_loss(model(input_ids=ids).logits, labels, estimator="exact") * n
            count += n
    torch.testing.assert_close(packed_loss, total / count, rtol=2e-2, atol=1e-3)


def test_chunked_loss_syncs_once_in_forward_and_never_in_backward():
    """The sync-free path on a real GPU: CUDA's sync debug mode warns at every sync."""
    import axolotl_otr.kernels.fused as fused
    from axolotl_otr.loss import select_targets

    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(2048, 896, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(32000, 896, device="cuda", generator=gen).bfloat16().div_(30)
    labels = torch.randint(0, 32000, (1, 2049), device="cuda", generator=gen)
    targets = select_targets(labels)
    for estimator in ("exact", "sampled"):
        args = (targets.rows, targets.tokens, targets.scale, Objective(estimator=estimator))
        args += (torch.Generator(device="cuda").manual_seed(0), 64)  # 32 chunks
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as forward_syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, _ = fused.fused_linear_loss(hidden[:-1], weight, None, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        with warnings.catch_warnings(record=True) as backward_syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(forward_syncs) == 1, [str(w.message) for w in forward_syncs]
        assert len(backward_syncs) == 0, [str(w.message) for w in backward_syncs]
        hidden.grad = None


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_compiled_chunk_math_equals_eager_on_cuda(estimator, recorded_draws, monkeypatch):
    import axolotl_otr.kernels.chunk_math as chunk_math

    gen = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(1, 1025, 256, device="cuda", generator=gen, requires_grad=True)
    weight = torch.randn(32000, 256, device="cuda", generator=gen).div_(16).requires_grad_()
    labels = torch.randint(0, 32000, (1, 1025), device="cuda", generator=gen)
    results = []
    for compile in (False, True):
        if compile:
            monkeypatch.setattr(chunk_math, "sample_tokens", replaying(recorded_draws))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = otr_loss_from_hidden(
                hidden, weight, labels, estimator=estimator, chunk_size=300, compile=compile,
                generator=torch.Generator(device="cuda").manual_seed(0),
            )  # fmt: skip
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_weight_gradient_is_accumulated_in_fp32_on_cuda():
    """As tests/unit/test_chunk_math.py on CPU: nearly parallel hidden states, one-row chunks;
    a bf16 accumulator swamps the later chunks, fp32 stays within 1e-2 (norm-wise)."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    base = torch.randn(1, 1, 32, device="cuda", generator=gen)
    hidden = base + 0.1 * torch.randn(1, 257, 32, device="cuda", generator=gen)
    hidden = hidden.bfloat16().requires_grad_()
    weight = torch.randn(50, 32, device="cuda", generator=gen).div_(4).bfloat16()
    weight.requires_grad_()
    labels = torch.randint(0, 50, (1, 257), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = otr_loss_from_hidden(hidden, weight, labels, estimator="exact", chunk_size=1)
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.dtype == torch.bfloat16
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ref = otr_loss(h32 @ w32.T, labels, estimator="exact", chunk_size=10**6)
    (ref_grad,) = torch.autograd.grad(ref, w32)
    assert (grad.float() - ref_grad).norm() / ref_grad.norm() < 1e-2


def test_default_chunk_size_on_cuda_follows_the_vocab_to_hidden_ratio(monkeypatch):
    import axolotl_otr.kernels.fused as fused

    seen = []
    original = fused._chunks
    monkeypatch.setattr(
        fused,
        "_chunks",
        lambda rows, size, sync_free: seen.append(size) or original(rows, size, sync_free),
    )
    hidden = torch.randn(1, 2049, 896, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(151936, 896, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 151936, (1, 2049), device="cuda")
    otr_loss_from_hidden(hidden, weight, labels)
    # Liger's rows for the 2049 positions given (16), or the rows the 32 MiB floor holds
    want = fused.default_chunk_size(151936, 2049, "cuda", 896, compute_dtype=torch.bfloat16)
    assert seen == [want]
    assert want >= 16


def test_bf16_lm_head_gradient_takes_the_fp32_accumulating_gemm_on_cuda(monkeypatch):
    """Issue 30, finding 6: on CUDA (compute capability 8+) each chunk adds its weight
    gradient in one bf16-in, fp32-out GEMM; the result is as precise as rounding the exact
    gradient once, and owns exactly its bytes (as tests/unit/test_weight_grad.py on CPU)."""
    import axolotl_otr.kernels.weight_grad as weight_grad
    from tests.support.head_memory import head_batch

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 GEMMs need compute capability 8")
    assert weight_grad.fused_fp32_addmm(torch.device("cuda"), torch.bfloat16)
    calls = []
    original = weight_grad.addmm_fp32
    monkeypatch.setattr(
        weight_grad, "addmm_fp32", lambda acc, a, b: calls.append(1) or original(acc, a, b)
    )
    hidden, weight, labels = (t.cuda() for t in head_batch(torch.bfloat16))
    weight.requires_grad_()
    otr_loss_from_hidden(hidden, weight, labels, objective="sft", chunk_size=1).backward()
    assert calls
    grad = weight.grad
    assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
    h64, w64 = hidden.double(), weight.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h64[0, :-1] @ w64.T, labels[0, 1:]).backward()
    want = w64.grad
    error = (grad.double() - want).norm() / want.norm()
    rounding = (want.to(torch.bfloat16).double() - want).norm() / want.norm()
    assert error <= 1.25 * rounding, (error.item(), rounding.item())


def test_a_trainable_bf16_lm_head_costs_at_most_2_2_copies_on_cuda():
    from tests.support.head_memory import trainable_head_cost

    copies, dtype = trainable_head_cost("cuda")
    assert dtype == torch.bfloat16
    assert copies <= 2.2, copies


def test_fp16_gradients_do_not_underflow_on_cuda():
    from tests.support.head_memory import fp16_gradient_errors

    error, lost, _ = fp16_gradient_errors("cuda")
    assert error < 5e-3 and lost < 1e-3, (error, lost)
