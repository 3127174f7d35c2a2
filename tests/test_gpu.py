"""Checks that need a CUDA GPU: bf16, the chunked path under autocast, the CUDA sampler,
4-bit QLoRA (bitsandbytes) and flash-attention with packed sequences.

Every test skips cleanly without CUDA (and without the optional package it needs); run
them all with `make gpu-check` (scripts/gpu_check.sh) on a machine with a GPU.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from reference import reference_loss
from trainer_setup import build_trainer, make_examples

from axolotl_otr import otr_loss, otr_loss_from_hidden
from axolotl_otr.objective import Objective
from axolotl_otr.trainer_hook import OTRSettings

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


def test_bf16_training_steps_through_the_trainer_hook(tiny_dir, tmp_path):
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
