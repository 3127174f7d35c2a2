"""Build the tiny offline model, tokenizer and dataset used by demos and tests.

Everything is generated locally and deterministically; nothing touches the network.
Running the script writes::

    OUT/
      model/            randomly initialised Llama causal LM + byte-level BPE tokenizer
      data/train.jsonl  alpaca-format (instruction/input/output) synthetic tasks
      data/heldout.jsonl  questions of the same tasks not in train.jsonl (demo accuracy)
      build_info.json   completion stamp; its presence makes later runs a no-op

Usage::

    python -m examples.tiny.build_tiny --out .cache/tiny [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BUILD_VERSION = 2  # 2: data/heldout.jsonl
VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
NUM_EXAMPLES = 400
NUM_HELDOUT = 96  # questions for the demo's before/after accuracy, none in train.jsonl

# Text of Axolotl's default alpaca ("instruct") prompt template. It is only added
# to the tokenizer's training corpus so the BPE merges cover the prompt scaffold
# and a full prompt + answer fits comfortably inside a 128-token sequence.
PROMPT_SCAFFOLD = (
    (
        "Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
        "### Response:\n{output}"
    ),
    (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Response:\n{output}"
    ),
)

Example = dict[str, str]
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "orbit",
    "candle", "forest", "window", "garden", "rocket", "silver", "planet", "butter",
)  # fmt: skip


def _task_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
    return {
        "instruction": "Add the two numbers.",
        "input": f"{a} {b}",
        "output": str(a + b),
    }


def _task_subtract(rng: random.Random) -> Example:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return {"instruction": f"Subtract {b} from {a}.", "input": "", "output": str(a - b)}


def _task_multiply(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"instruction": f"Multiply {a} by {b}.", "input": "", "output": str(a * b)}


def _task_reverse_digits(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    if rng.random() < 0.5:
        return {
            "instruction": f"Reverse the digits {digits}.",
            "input": "",
            "output": digits[::-1],
        }
    return {
        "instruction": "Reverse the digits.",
        "input": digits,
        "output": digits[::-1],
    }


def _task_sort_digits(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return {
        "instruction": "Sort the digits in ascending order.",
        "input": digits,
        "output": "".join(sorted(digits)),
    }


def _task_uppercase(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return {
        "instruction": "Write the word in uppercase.",
        "input": word,
        "output": word.upper(),
    }


def _task_reverse_word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return {
        "instruction": f"Spell {word} backwards.",
        "input": "",
        "output": word[::-1],
    }


def _task_max(rng: random.Random) -> Example:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    listed = ", ".join(map(str, nums))
    return {
        "instruction": "Give the largest number in the list.",
        "input": listed,
        "output": str(max(nums)),
    }


TASKS: tuple[Callable[[random.Random], Example], ...] = (
    _task_add,
    _task_subtract,
    _task_multiply,
    _task_reverse_digits,
    _task_sort_digits,
    _task_uppercase,
    _task_reverse_word,
    _task_max,
)


def make_examples(seed: int, n: int = NUM_EXAMPLES) -> list[Example]:
    """Return ``n`` alpaca examples, cycling through every task type in turn."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(n)]


def make_heldout(seed: int, train: list[Example], n: int = NUM_HELDOUT) -> list[Example]:
    """``n`` examples of the tasks (in turn) whose question is in neither ``train`` nor
    the warm-up corpus: what the demo's accuracy is measured on. Tasks with few possible
    questions (the 16 words) may have none left; they are then skipped."""
    seen = {(ex["instruction"], ex["input"]) for ex in train}
    warmup = make_examples(seed + 1000, 4 * len(train))
    seen |= {(ex["instruction"], ex["input"]) for ex in warmup}
    rng = random.Random(seed + 2000)
    heldout: list[Example] = []
    for attempt in range(200 * n):
        ex = TASKS[attempt % len(TASKS)](rng)
        if (ex["instruction"], ex["input"]) not in seen:
            seen.add((ex["instruction"], ex["input"]))
            heldout.append(ex)
            if len(heldout) == n:
                break
    return heldout


def _corpus(examples: list[Example]) -> Iterator[str]:
    """Yield tokenizer training text: each example rendered in both prompt layouts."""
    for ex in examples:
        for scaffold in PROMPT_SCAFFOLD:
            yield scaffold.format(**ex)


def build_tokenizer(examples: list[Example]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``examples`` and wrap it for transformers.

    Digits are split individually before BPE so numbers tokenize one digit per token.
    The wrapper prepends ``<s>`` to every encoding and does *not* append ``</s>``:
    Axolotl's alpaca strategy appends the EOS token itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(examples), trainer=trainer)
    # add_bos_token/add_eos_token make transformers install (and persist) a
    # TemplateProcessing post-processor of the form "<s> $A".
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """Return a seeded, randomly initialised tiny Llama sized to ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    steps: int,
    seed: int,
) -> list[float]:
    """Warm the random model up with plain next-token CE on prompt+answer texts.

    OTR, like DFT, weights each target by the probability the policy already gives it,
    so it refines a pretrained model; from random weights (p(y) ~ 1/vocab) it barely
    moves. The demo therefore starts from this briefly pre-trained "base model", trained
    on examples other than the ones it is then fine-tuned on. Returns the losses.
    """
    import torch

    texts = [PROMPT_SCAFFOLD[0 if ex["input"] else 1].format(**ex) + EOS for ex in examples]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _stamp(seed: int, pretrain_steps: int = 0) -> dict[str, int]:
    return {"version": BUILD_VERSION, "seed": seed, "pretrain_steps": pretrain_steps}


def is_complete(out: Path, seed: int, pretrain_steps: int = 0) -> bool:
    """Return True when ``out`` already holds a finished build for ``seed``."""
    info = out / "build_info.json"
    if not info.is_file():
        return False
    try:
        recorded = json.loads(info.read_text())
    except json.JSONDecodeError:
        return False
    needed = [
        out / "data" / "train.jsonl",
        out / "data" / "heldout.jsonl",
        out / "model" / "config.json",
        out / "model" / "model.safetensors",
        out / "model" / "tokenizer.json",
    ]
    return all(p.is_file() for p in needed) and all(
        recorded.get(k, 0) == v for k, v in _stamp(seed, pretrain_steps).items()
    )


def build(out: Path, *, seed: int = 0, force: bool = False, pretrain_steps: int = 0) -> bool:
    """Write model, tokenizer and dataset under ``out``; return False if skipped.

    With ``pretrain_steps`` the model is first warmed up with CE (see ``pretrain``).
    """
    if not force and is_complete(out, seed, pretrain_steps):
        return False
    info = out / "build_info.json"
    info.unlink(missing_ok=True)
    for sub in ("model", "data"):
        shutil.rmtree(out / sub, ignore_errors=True)

    examples = make_examples(seed)
    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    with (data_dir / "train.jsonl").open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex) + "\n")
    with (data_dir / "heldout.jsonl").open("w", encoding="utf-8") as fh:
        for ex in make_heldout(seed, examples):
            fh.write(json.dumps(ex) + "\n")

    tokenizer = build_tokenizer(examples)
    model = build_model(tokenizer, seed)
    losses = []
    if pretrain_steps:
        corpus = make_examples(seed + 1000, n=4 * NUM_EXAMPLES)
        losses = pretrain(model, tokenizer, corpus, pretrain_steps, seed)
        model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    # Written last: its presence marks the build as complete.
    info.write_text(
        json.dumps(
            {
                **_stamp(seed, pretrain_steps),
                "examples": len(examples),
                "vocab_size": len(tokenizer),
                "pretrain_loss": [round(x, 4) for x in losses[:1] + losses[-1:]],
            },
            indent=2,
        )
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build (or skip) and report the elapsed time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory, e.g. .cache/tiny"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data and weights (default: 0)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if OUT is already complete"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="warm the random model up with this many CE steps on other examples "
        "(default: 0, a purely random model)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    built = build(args.out, seed=args.seed, force=args.force, pretrain_steps=args.pretrain_steps)
    elapsed = time.perf_counter() - start
    status = "built" if built else "already complete, skipped"
    print(f"{args.out}: {status} ({elapsed:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
