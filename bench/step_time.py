"""Full training-step time and peak memory: SFT (the default loss) vs OTR (K=256, sampled).

Both variants run through a real Hugging Face ``Trainer`` over one shared LoRA model:
``trainer.training_step`` (the trainer's own forward, loss and backward, so OTR goes
through the exact ``compute_loss`` / ``compute_loss_func`` that ``install_otr`` puts on
the trainer, chunked from hidden states) followed by the optimizer step. SFT and OTR steps
alternate in one process after warm-up; the figures are medians.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each variant's steps; on
CPU, the peak RSS of a separate process per variant (same model, a few steps).

The gated shape is Qwen2.5-0.5B (random init, tied embeddings) with LoRA r=16 on all
linear projections, sequence 512, micro-batch 1. A loss-dominated shape (hidden 256, two
layers, same vocabulary) is reported too. The last line is
``step_time_ratio=<otr/sft> peak_mem_ratio=<otr/sft>`` for the gated shape.

    python bench/step_time.py                 # CPU, a few minutes
    python bench/step_time.py --device cuda
    python bench/step_time.py --quick         # tiny shapes, a CI smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("sft", "otr")


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
LOSS_HEAVY = Shape("loss-dominated", 256, 2, 4, 2, 1024, 151936, 512)
QUICK = Shape("quick", 64, 2, 4, 2, 128, 1000, 64)
QUICK_LOSS = Shape("quick-loss", 32, 1, 2, 1, 64, 4000, 64)


def build(shape: Shape, device: str, dtype: torch.dtype, output_dir: str):
    """(model, {variant: (trainer, optimizer)}, inputs) sharing one LoRA model."""
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
    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=model, args=args)
        if variant == "otr":
            settings = OTRSettings(Objective("otr", num_samples=256), seed=0)
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


def run_shape(shape: Shape, device: str, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    """Median step seconds of each variant (interleaved) and, on CUDA, peak memory."""
    with tempfile.TemporaryDirectory() as out:
        model, trainers, inputs = build(shape, device, dtype, out)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks = {v: 0 for v in VARIANTS}
        for round_index in range(warmup + steps):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                elapsed = step(trainers[variant], model, inputs)
                if device == "cuda":
                    peaks[variant] = max(peaks[variant], torch.cuda.max_memory_allocated())
                if round_index >= warmup:
                    times[variant].append(elapsed)
    result = {f"{v}_s": statistics.median(times[v]) for v in VARIANTS}
    if device == "cuda":
        result.update({f"{v}_peak_bytes": peaks[v] for v in VARIANTS})
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
        model, trainers, inputs = build(shape, "cpu", dtype, out)
        gc.collect()
        _reset_peak_rss()
        for _ in range(steps):
            step(trainers[variant], model, inputs)
    print(_peak_rss_bytes())


def report(shape: Shape, args, dtype: torch.dtype) -> tuple[float, float]:
    """Print one shape's figures; return (time ratio, memory ratio)."""
    res = run_shape(shape, args.device, dtype, args.warmup, args.steps)
    if args.device == "cuda":
        peaks = {v: res[f"{v}_peak_bytes"] for v in VARIANTS}
        how = "CUDA max allocated"
    elif args.quick:
        # A fresh process per variant costs seconds of imports and the tiny model's
        # memory is all interpreter: a smoke test does not measure it.
        peaks = {v: float("nan") for v in VARIANTS}
        how = "not measured with --quick"
    else:
        peaks = {v: child_peak_rss(shape, v, args.dtype, args.memory_steps) for v in VARIANTS}
        how = "peak RSS, one process per variant"
    print(
        f"[{shape.name}: hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}, "
        f"seq {shape.seq}, LoRA r=16, {args.dtype}, {args.device}] "
        f"median of {args.steps} interleaved steps:"
    )
    for v in VARIANTS:
        print(f"  {v}: {res[f'{v}_s']:8.3f} s/step   peak {peaks[v] / 2**20:9.1f} MiB ({how})")
    time_ratio = res["otr_s"] / res["sft_s"]
    mem_ratio = peaks["otr"] / peaks["sft"]
    print(f"  otr/sft: time {time_ratio:.3f}, peak memory {mem_ratio:.3f}")
    return time_ratio, mem_ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory child")
    parser.add_argument("--no-loss-shape", action="store_true", help="skip the ungated shape")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if args.child:
        child_main(args.child, Shape(**json.loads(args.child_shape)), dtype, args.child_steps)
        return 0

    import transformers

    transformers.logging.set_verbosity_error()
    gated, extra = (QUICK, QUICK_LOSS) if args.quick else (QWEN05, LOSS_HEAVY)
    if args.quick:
        args.warmup, args.steps, args.no_loss_shape = 1, 2, True
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.no_loss_shape:
        report(extra, args, dtype)
    time_ratio, mem_ratio = report(gated, args, dtype)
    print(f"step_time_ratio={time_ratio:.3f} peak_mem_ratio={mem_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
