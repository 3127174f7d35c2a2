"""Full training-step time and peak memory: SFT (the default loss) against OTR.

Every variant runs through a real Hugging Face ``Trainer`` over one shared LoRA model:
``trainer.training_step`` (the trainer's own forward, loss and backward, so OTR goes
through the exact ``compute_loss`` / ``compute_loss_func`` that ``install_otr`` puts on
the trainer, chunked from hidden states) followed by the optimizer step. The variants'
steps alternate in one process after warm-up; the figures are medians.

Variants: ``sft`` (the model's own cross-entropy on full logits), ``sft_liger`` (SFT with
Liger-Kernel's fused linear cross-entropy on the last hidden state; CUDA and the
``liger-kernel`` package needed, else skipped with a line saying so), ``otr_sampled``
(K=256), ``otr_exact``, and with ``--compile`` ``otr_sampled_compiled`` /
``otr_exact_compiled`` (``otr_compile: true``).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each variant's steps; on
CPU, the peak RSS of a separate process per variant (same model, a few steps).

CPU (default): the gated shape is Qwen2.5-0.5B (random init, tied embeddings) with LoRA
r=16 on all linear projections, sequence 512, micro-batch 1, SFT against OTR-sampled; a
loss-dominated shape (hidden 256, two layers, same vocabulary) is reported too. CUDA
(default): Qwen2.5-0.5B and Qwen2.5-1.5B shapes, bf16, sequence 2048, all variants. The
last line is ``step_time_ratio=<otr_sampled/sft> peak_mem_ratio=<otr_sampled/sft>`` for
the first gated shape, plus ``*_vs_liger`` ratios when Liger ran.

    python bench/step_time.py                 # CPU, a few minutes
    python bench/step_time.py --device cuda --json bench/results/gpu/step_time.json
    python bench/step_time.py --quick         # tiny shapes, a CI smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_VARIANTS = (
    "sft",
    "sft_liger",
    "otr_sampled",
    "otr_exact",
    "otr_sampled_compiled",
    "otr_exact_compiled",
)


@dataclass
class Shape:
    """A Qwen2 model shape and the batch it trains on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int


QWEN05 = Shape("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, 512)
QWEN15 = Shape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, 2048)
LOSS_HEAVY = Shape("loss-dominated", 256, 2, 4, 2, 1024, 151936, 512)
QUICK = Shape("quick", 64, 2, 4, 2, 128, 1000, 64)
QUICK_LOSS = Shape("quick-loss", 32, 1, 2, 1, 64, 4000, 64)


def liger_trainer_class():
    """A ``Trainer`` whose loss is Liger's fused linear CE on the last hidden state,
    what ``liger_fused_linear_cross_entropy: true`` gives Axolotl users."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from transformers import Trainer

    class LigerSFTTrainer(Trainer):
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal_lm = model.get_base_model()  # peft's wrapper; LoRA layers are inside
            hidden = causal_lm.model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            labels = inputs["labels"][:, 1:].reshape(-1)
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            loss = self.liger(causal_lm.lm_head.weight, hidden, labels)
            count = num_items_in_batch or (labels != -100).sum()
            return loss / count

    return LigerSFTTrainer


def skipped_variants(variants: list[str], device: str) -> dict[str, str]:
    """{variant: why it cannot run here}."""
    why = {}
    if "sft_liger" in variants:
        if importlib.util.find_spec("liger_kernel") is None:
            why["sft_liger"] = "liger-kernel is not installed"
        elif device != "cuda":
            why["sft_liger"] = "liger-kernel needs CUDA (Triton)"
    return why


def build(shape: Shape, device: str, dtype: torch.dtype, output_dir: str, variants: list[str]):
    """(model, {variant: trainer}, inputs) sharing one LoRA model."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

    from axolotl_otr.objective import Objective
    from axolotl_otr.trainer_hook import OTRSettings, install_otr

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max(4096, shape.seq),
        tie_word_embeddings=True,
    )
    # sdpa: the attention every check here uses (flash-attn cannot be carried to a GPU box)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainers = {}
    for variant in variants:
        cls = liger_trainer_class() if variant == "sft_liger" else Trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=model, args=args)
        if variant.startswith("otr"):
            estimator = "exact" if "exact" in variant else "sampled"
            objective = Objective("otr", num_samples=256, estimator=estimator)
            settings = OTRSettings(objective, seed=0, compile=variant.endswith("compiled"))
            hook = install_otr(trainer, settings)
            if hook.output_layer.weight_and_bias is None:
                raise RuntimeError(f"OTR fell back to full logits: {hook.output_layer.reason}")
        trainer.create_optimizer()
        trainers[variant] = trainer
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, shape.seq), generator=gen)
    labels = ids.clone()
    labels[:, : shape.seq // 8] = -100  # a prompt
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }
    return model, trainers, inputs


def step(trainer, model, inputs: dict) -> float:
    """Seconds of one full step: forward, loss, backward, optimizer, zero_grad."""
    sync = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)
    num_items = int((inputs["labels"][:, 1:] != -100).sum())
    sync()
    start = time.perf_counter()
    trainer.training_step(model, dict(inputs), num_items_in_batch=num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def run_shape(
    shape: Shape, device: str, dtype: torch.dtype, warmup: int, steps: int, variants: list[str]
) -> dict:
    """Median step seconds of each variant (interleaved) and, on CUDA, peak memory."""
    with tempfile.TemporaryDirectory() as out:
        model, trainers, inputs = build(shape, device, dtype, out, variants)
        times: dict[str, list[float]] = {v: [] for v in variants}
        peaks = dict.fromkeys(variants, 0)
        for round_index in range(warmup + steps):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                elapsed = step(trainers[variant], model, inputs)
                if device == "cuda":
                    peaks[variant] = max(peaks[variant], torch.cuda.max_memory_allocated())
                if round_index >= warmup:
                    times[variant].append(elapsed)
        del model, trainers
    result = {f"{v}_s": statistics.median(times[v]) for v in variants}
    if device == "cuda":
        result.update({f"{v}_peak_bytes": peaks[v] for v in variants})
        torch.cuda.empty_cache()
    return result


def child_peak_rss(shape: Shape, variant: str, dtype: str, steps: int) -> int:
    """Peak RSS in bytes of a fresh process running ``steps`` steps of one variant."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--dtype", dtype]
    cmd += ["--child-shape", json.dumps(asdict(shape)), "--child-steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM (peak RSS since the last reset) if readable, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_main(variant: str, shape: Shape, dtype: torch.dtype, steps: int) -> None:
    """Print the peak RSS of ``steps`` training steps (model, data and optimizer state
    included; the transient peaks of random initialization and imports excluded when the
    kernel allows resetting the mark, which would otherwise hide the steps' own peak)."""
    import gc

    with tempfile.TemporaryDirectory() as out:
        model, trainers, inputs = build(shape, "cpu", dtype, out, [variant])
        gc.collect()
        _reset_peak_rss()
        for _ in range(steps):
            step(trainers[variant], model, inputs)
    print(_peak_rss_bytes())


def report(shape: Shape, args, dtype: torch.dtype, variants: list[str]) -> dict:
    """Print one shape's figures; return them with the ratios against SFT (and Liger)."""
    res = run_shape(shape, args.device, dtype, args.warmup, args.steps, variants)
    if args.device == "cuda":
        peaks = {v: res[f"{v}_peak_bytes"] for v in variants}
        how = "CUDA max allocated"
    elif args.quick:
        # A fresh process per variant costs seconds of imports and the tiny model's
        # memory is all interpreter: a smoke test does not measure it.
        peaks = {v: float("nan") for v in variants}
        how = "not measured with --quick"
    else:
        peaks = {v: child_peak_rss(shape, v, args.dtype, args.memory_steps) for v in variants}
        how = "peak RSS, one process per variant"
    print(
        f"[{shape.name}: hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}, "
        f"seq {shape.seq}, LoRA r=16, {args.dtype}, {args.device}] "
        f"median of {args.steps} interleaved steps:"
    )
    figures = {"shape": asdict(shape), "variants": {}}
    for v in variants:
        seconds, peak = res[f"{v}_s"], peaks[v]
        line = f"  {v:22s} {seconds:8.3f} s/step   peak {peak / 2**20:9.1f} MiB"
        ratios = {}
        for base in ("sft", "sft_liger"):
            if base in variants and v != base:
                ratios[f"time_vs_{base}"] = seconds / res[f"{base}_s"]
                ratios[f"mem_vs_{base}"] = peak / peaks[base]
                line += f"  {base}: time {ratios[f'time_vs_{base}']:.3f}"
                line += f" mem {ratios[f'mem_vs_{base}']:.3f}"
        print(line)
        figures["variants"][v] = {"s_per_step": seconds, "peak_bytes": peak, **ratios}
    print(f"  ({how})")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory child")
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=None)
    parser.add_argument("--compile", action="store_true", help="add the compiled OTR variants")
    parser.add_argument("--shapes", nargs="+", default=None, help="qwen2.5-0.5b qwen2.5-1.5b")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of all shapes")
    parser.add_argument("--no-loss-shape", action="store_true", help="skip the ungated shape")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--child", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, args.dtype)
    if args.child:
        child_main(args.child, Shape(**json.loads(args.child_shape)), dtype, args.child_steps)
        return 0

    import transformers

    transformers.logging.set_verbosity_error()
    variants = args.variants or (
        ["sft", "sft_liger", "otr_sampled", "otr_exact"] if cuda else ["sft", "otr_sampled"]
    )
    if args.compile:
        variants += [v for v in ("otr_sampled_compiled", "otr_exact_compiled") if v not in variants]
    for variant, why in skipped_variants(variants, args.device).items():
        print(f"skipped {variant}: {why}")
        variants.remove(variant)
    known = {s.name: s for s in (QWEN05, QWEN15)}
    if args.quick:
        gated, extra = [QUICK], QUICK_LOSS
        args.warmup, args.steps, args.no_loss_shape = 1, 2, True
    else:
        names = args.shapes or (["qwen2.5-0.5b", "qwen2.5-1.5b"] if cuda else ["qwen2.5-0.5b"])
        gated, extra = [known[n] for n in names], LOSS_HEAVY
        seq = args.seq or (2048 if cuda else None)
        if seq:
            gated = [replace(s, seq=seq) for s in gated]
    if cuda:
        args.no_loss_shape = True  # the loss-dominated shape is a CPU diagnostic
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, variants {variants}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name()}")
    if not args.no_loss_shape:
        report(extra, args, dtype, variants)
    results = [report(shape, args, dtype, variants) for shape in gated]
    if args.json:
        meta = {"torch": torch.__version__, "device": args.device, "dtype": args.dtype}
        if cuda:
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump({**meta, "shapes": results}, f, indent=1)
    first = results[0]["variants"].get("otr_sampled", {})
    keys = {"step_time_ratio": "time_vs_sft", "peak_mem_ratio": "mem_vs_sft"}
    keys.update({f"otr_{k}_vs_liger": f"{k}_vs_sft_liger" for k in ("time", "mem")})
    print(" ".join(f"{out}={first[key]:.3f}" for out, key in keys.items() if key in first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
