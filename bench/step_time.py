"""Full training-step time and peak memory through a real Trainer: SFT against OTR.

Every run is ``trainer.train()`` of a Hugging Face ``Trainer``, as a user's run: the
Trainer's accelerator prepares the model (``accelerator.prepare``: with ``bf16`` its
forward runs under autocast and its outputs are converted to fp32), its dataloader,
optimizer, gradient clipping and scheduler run, and OTR goes through the exact
``compute_loss`` / ``compute_loss_func`` that ``install_otr`` puts on the trainer. A
callback times each optimizer step (``on_step_begin`` to ``on_step_end``); the first
``--warmup`` steps of a run are dropped. Each run starts from a copy of the same
randomly initialized model, and the runs alternate between variants (ABBA order over
``--rounds``), so load from other processes hits every variant alike; figures are medians.

Variants: ``sft`` (the model's own cross-entropy on full logits), ``sft_chunked`` (the
``sft`` objective through the same chunked path as OTR), ``sft_liger`` (Liger-Kernel's
fused linear cross-entropy on the last hidden state; CUDA and ``liger-kernel`` needed,
else skipped with a line saying so), ``otr_sampled`` (K=256), ``otr_exact``, and with
``--compile`` ``otr_sampled_compiled`` / ``otr_exact_compiled``. Heads (``--heads``):
``frozen`` (LoRA r=16 on every linear projection, the lm_head frozen) and ``trainable``
(the same plus ``modules_to_save: [embed_tokens, lm_head]``, as when a chat template adds
tokens).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each run; on CPU, the peak
RSS of a separate process per variant and head (same model, ``--memory-steps`` steps,
the mark reset after the model is built).

CPU (default): Qwen2.5-0.5B shape (random init, tied embeddings), bf16 weights and bf16
autocast, sequence 512, micro-batch 1; variants ``sft``, ``sft_chunked``,
``otr_sampled``; both heads. CUDA (default): Qwen2.5-0.5B and Qwen2.5-1.5B shapes, bf16,
sequence 2048, all variants, frozen head. The last line is
``step_time_ratio=<otr_sampled/sft> peak_mem_ratio=<otr_sampled/sft>`` for the first
shape and head, plus ``*_vs_liger`` ratios when Liger ran.

    python -m bench.step_time                 # CPU, several minutes
    python -m bench.step_time --device cuda --json bench/results/gpu/step_time.json
    python -m bench.step_time --quick         # tiny shapes, a CI smoke test
"""

from __future__ import annotations

import argparse
import copy
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

# Memory children run this module again (``python -m bench.step_time``) from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_VARIANTS = (
    "sft",
    "sft_chunked",
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


HEADS = ("frozen", "trainable")


def base_model(shape: Shape, device: str, dtype: torch.dtype):
    """The randomly initialized Qwen2 model every run copies."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

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
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def peft_model(base, head: str):
    """LoRA r=16 on every linear projection; ``trainable``: embeddings and lm_head too."""
    from peft import LoraConfig, get_peft_model

    save = ["embed_tokens", "lm_head"] if head == "trainable" else None
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=save
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), lora)


class StepTimer:
    """A ``TrainerCallback`` that records the seconds of every optimizer step."""

    def __new__(cls, cuda: bool):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._start = 0.0

            def _sync(self) -> None:
                if cuda:
                    torch.cuda.synchronize()

            def on_step_begin(self, args, state, control, **kwargs):
                self._sync()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self._sync()
                self.seconds.append(time.perf_counter() - self._start)

        return _Timer()


def examples(shape: Shape, count: int) -> list[dict]:
    """``count`` copies of one sequence whose first eighth is a prompt (no loss)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.seq,), generator=gen)
    labels = ids.clone()
    labels[: shape.seq // 8] = -100
    mask = torch.ones_like(ids)
    return [{"input_ids": ids, "labels": labels, "attention_mask": mask}] * count


def trainer_for(
    model, shape: Shape, variant: str, device: str, dtype: torch.dtype, out: str, steps: int
):
    """A ``Trainer`` of ``steps`` optimizer steps over ``model`` for one variant."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from axolotl_otr import OTRSettings, install_otr
    from axolotl_otr.objective import Objective

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cls = liger_trainer_class() if variant == "sft_liger" else Trainer
    data = examples(shape, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, args=args, train_dataset=data)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict says nothing here
    if variant.startswith("otr") or variant == "sft_chunked":
        if variant == "sft_chunked":
            objective = Objective("sft")
        else:
            estimator = "exact" if "exact" in variant else "sampled"
            objective = Objective("otr", num_samples=256, estimator=estimator)
        settings = OTRSettings(objective, seed=0, compile=variant.endswith("compiled"))
        hook = install_otr(trainer, settings)
        if hook.output_layer.weight_and_bias is None:
            raise RuntimeError(f"OTR fell back to full logits: {hook.output_layer.reason}")
    return trainer


def run_once(base, shape: Shape, variant: str, head: str, args, dtype) -> tuple[list[float], int]:
    """(seconds of each timed step, CUDA peak bytes or 0) of one ``trainer.train()``."""
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as out:
        model = peft_model(base, head)
        steps = args.warmup + args.steps
        trainer = trainer_for(model, shape, variant, args.device, dtype, out, steps)
        timer = StepTimer(cuda)
        trainer.add_callback(timer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return timer.seconds[args.warmup :], peak


def run_shape(shape: Shape, args, dtype: torch.dtype, variants: list[str], head: str) -> dict:
    """Median step seconds of each variant over ``args.rounds`` alternating runs."""
    base = base_model(shape, args.device, dtype)
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks = dict.fromkeys(variants, 0)
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            seconds, peak = run_once(base, shape, variant, head, args, dtype)
            times[variant] += seconds
            peaks[variant] = max(peaks[variant], peak)
    del base
    result = {f"{v}_s": statistics.median(times[v]) for v in variants}
    if args.device == "cuda":
        result.update({f"{v}_peak_bytes": peaks[v] for v in variants})
    return result


def child_peak_rss(shape: Shape, variant: str, head: str, dtype: str, steps: int) -> int:
    """Peak RSS in bytes of a fresh process running ``steps`` steps of one variant."""
    cmd = [sys.executable, "-m", "bench.step_time", "--child", variant, "--dtype", dtype]
    cmd += ["--child-shape", json.dumps(asdict(shape)), "--child-steps", str(steps)]
    cmd += ["--child-head", head]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
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


def child_main(variant: str, head: str, shape: Shape, dtype: torch.dtype, steps: int) -> None:
    """Print the peak RSS of ``steps`` training steps through ``trainer.train()`` (model,
    data, optimizer state included; the transient peaks of random initialization and
    imports excluded when the kernel allows resetting the mark)."""
    import gc

    base = base_model(shape, "cpu", dtype)
    with tempfile.TemporaryDirectory() as out:
        model = peft_model(base, head)
        del base
        trainer = trainer_for(model, shape, variant, "cpu", dtype, out, steps)
        gc.collect()
        _reset_peak_rss()
        trainer.train()
    print(_peak_rss_bytes())


def report(shape: Shape, args, dtype: torch.dtype, variants: list[str], head: str) -> dict:
    """Print one shape's figures; return them with the ratios against SFT (and Liger)."""
    res = run_shape(shape, args, dtype, variants, head)
    if args.device == "cuda":
        peaks = {v: res[f"{v}_peak_bytes"] for v in variants}
        how = "CUDA max allocated"
    elif args.quick or not args.memory_steps:
        # A fresh process per variant costs seconds of imports and the tiny model's
        # memory is all interpreter: a smoke test does not measure it.
        peaks = {v: float("nan") for v in variants}
        how = "not measured (--quick or --memory-steps 0)"
    else:
        peaks = {v: child_peak_rss(shape, v, head, args.dtype, args.memory_steps) for v in variants}
        how = "peak RSS, one process per variant"
    print(
        f"[{shape.name}: hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}, "
        f"seq {shape.seq}, LoRA r=16, lm_head {head}, {args.dtype}, {args.device}] "
        f"median of {args.steps} steps x {args.rounds} alternating trainer.train() runs:"
    )
    figures = {"shape": asdict(shape), "head": head, "variants": {}}
    for v in variants:
        seconds, peak = res[f"{v}_s"], peaks[v]
        line = f"  {v:22s} {seconds:8.3f} s/step   peak {peak / 2**20:9.1f} MiB"
        ratios = {}
        for base in ("sft", "sft_chunked", "sft_liger"):
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
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per variant")
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps per memory child (CPU; 0: none)"
    )
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=None)
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=None)
    parser.add_argument("--compile", action="store_true", help="add the compiled OTR variants")
    parser.add_argument("--shapes", nargs="+", default=None, help="qwen2.5-0.5b qwen2.5-1.5b")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of all shapes")
    parser.add_argument("--loss-shape", action="store_true", help="add the loss-dominated shape")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--child", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-head", choices=HEADS, default="frozen", help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    if args.child:
        shape = Shape(**json.loads(args.child_shape))
        child_main(args.child, args.child_head, shape, dtype, args.child_steps)
        return 0

    import transformers

    transformers.logging.set_verbosity_error()
    variants = args.variants or (
        ["sft", "sft_liger", "otr_sampled", "otr_exact"]
        if cuda
        else ["sft", "sft_chunked", "otr_sampled"]
    )
    if args.compile:
        variants += [v for v in ("otr_sampled_compiled", "otr_exact_compiled") if v not in variants]
    for variant, why in skipped_variants(variants, args.device).items():
        print(f"skipped {variant}: {why}")
        variants.remove(variant)
    heads = args.heads or (["frozen"] if cuda else list(HEADS))
    known = {s.name: s for s in (QWEN05, QWEN15)}
    if args.quick:
        shapes = [QUICK, QUICK_LOSS]
        args.warmup, args.steps, args.rounds = 1, 1, 1
    else:
        names = args.shapes or (["qwen2.5-0.5b", "qwen2.5-1.5b"] if cuda else ["qwen2.5-0.5b"])
        shapes = [known[n] for n in names]
        seq = args.seq or (2048 if cuda else None)
        if seq:
            shapes = [replace(s, seq=seq) for s in shapes]
        if args.loss_shape:
            shapes.append(LOSS_HEAVY)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, variants {variants}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name()}")
    results = [report(s, args, dtype, variants, head) for s in shapes for head in heads]
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
